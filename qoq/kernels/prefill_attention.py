"""Causal prefill attention over variable-length sequences packed along the token axis.

q [T, Hq, D], k/v [T, Hkv, D] (fp16/bf16, K/V not yet quantized: prefill attends over full-precision
K/V and kv_cache.rope_kv_write quantizes them into the cache separately),
cu_seqlens int32 [B + 1] (sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1]).
Triton: flash-attention forward, one program per (query block, sequence, q head), online
softmax in base 2, fp32 accumulators; blocks entirely above the diagonal are never visited.
"""

from __future__ import annotations

import math

import torch

from qoq.kernels.dispatch import dispatch, lazy_jit, output_like
from qoq.kernels.kv_cache import token_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _check(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError("num_q_heads must be a multiple of num_kv_heads")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be [B + 1]")


def prefill_attention_ref(q, k, v, cu_seqlens, scale, max_seqlen=None, out=None, options=None):
    _check(q, k, v, cu_seqlens)
    group = q.shape[1] // k.shape[1]
    out = output_like(q, out)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # [H, L, D]
        ks = k[start:end].float().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[start:end].float().transpose(0, 1).repeat_interleave(group, 0)
        s = qs @ ks.transpose(1, 2) * scale
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        p = torch.softmax(s.masked_fill(causal, -math.inf), dim=-1)
        out[start:end] = (p @ vs).transpose(0, 1).to(q.dtype)
    return out


@lazy_jit.helper
def _attend(q, kt, vt, m_i, l_i, acc, sm_scale_log2, offs_m, n, seq_len, MASK: tl.constexpr):
    """One key block of the online softmax; MASK: apply the causal and sequence-end mask."""
    s = tl.dot(q, tl.trans(kt)) * sm_scale_log2
    if MASK:
        s = tl.where((n[None, :] <= offs_m[:, None]) & (n < seq_len)[None, :], s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
    return m_new, l_i, acc


@lazy_jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, HQ, HKV, sm_scale_log2, stride_q, stride_k, stride_v,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    mb = tl.program_id(0)
    b = tl.program_id(1)
    hq = tl.program_id(2)
    hk = hq // GROUP
    start = tl.load(cu_ptr + b)
    seq_len = tl.load(cu_ptr + b + 1) - start
    if mb * BLOCK_M >= seq_len:
        return
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    m_mask = offs_m < seq_len
    tok = (start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + (tok * stride_q + hq * D)[:, None] + d[None, :], mask=m_mask[:, None], other=0.0)

    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    k_base = k_ptr + hk * D + d[None, :]
    v_base = v_ptr + hk * D + d[None, :]
    # Key blocks wholly below the diagonal (every key < this block's first query <= seq_len): no
    # masks at all, neither causal nor bounds. Then the blocks the diagonal crosses, masked.
    diag = mb * BLOCK_M // BLOCK_N * BLOCK_N
    for n0 in range(0, diag, BLOCK_N):
        ktok = (start + n0 + offs_n).to(tl.int64)
        kt = tl.load(k_base + (ktok * stride_k)[:, None])
        vt = tl.load(v_base + (ktok * stride_v)[:, None])
        m_i, l_i, acc = _attend(q, kt, vt, m_i, l_i, acc, sm_scale_log2, offs_m, n0 + offs_n, seq_len, False)
    hi = tl.minimum(seq_len, (mb + 1) * BLOCK_M)
    for n0 in range(diag, hi, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < seq_len
        ktok = (start + n).to(tl.int64)
        kt = tl.load(k_base + (ktok * stride_k)[:, None], mask=n_mask[:, None], other=0.0)
        vt = tl.load(v_base + (ktok * stride_v)[:, None], mask=n_mask[:, None], other=0.0)
        m_i, l_i, acc = _attend(q, kt, vt, m_i, l_i, acc, sm_scale_log2, offs_m, n, seq_len, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (tok * HQ + hq)[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None])


def prefill_attention_triton(q, k, v, cu_seqlens, scale, max_seqlen=None, out=None, options=None):
    """options: tile overrides (BLOCK_M, BLOCK_N, num_warps, num_stages), for tuning probes."""
    _check(q, k, v, cu_seqlens)
    t, hq, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Triton prefill needs a power-of-two head_dim >= 16, got {d}")
    q, k, v = (token_rows(x) for x in (q, k, v))
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = output_like(q, out)
    # 64x64 tiles, 4 warps: the fastest shape probed on the H100
    # (benchmarks/results/prefill-attention-probe-h100.json).
    block = 64 if q.is_cuda else 16  # interpreter: small tiles keep the CPU test fast
    opts = dict(BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=3)
    opts.update(options or {})
    grid = (triton.cdiv(max_seqlen, opts["BLOCK_M"]), cu_seqlens.numel() - 1, hq)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens, hq, k.shape[1], float(scale) * math.log2(math.e),
        q.stride(0), k.stride(0), v.stride(0),
        GROUP=hq // k.shape[1], D=d, BLOCK_M=opts["BLOCK_M"], BLOCK_N=opts["BLOCK_N"],
        num_warps=opts["num_warps"], num_stages=opts["num_stages"],
    )
    return out


prefill_attention = dispatch(prefill_attention_ref, prefill_attention_triton)
