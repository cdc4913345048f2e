"""Causal prefill attention whose keys and values are read from the paged KV cache.

A prefill chunk (chunked prefill, or a prompt whose first pages came from the prefix cache)
attends over tokens written by earlier steps, which exist only as pages. So every query of the
chunk reads K/V from the pages (its own tokens too, written by `rope_kv_write` just before):
a prompt's numbers then do not depend on how it was split into chunks or which of its pages were
cached (docs/serving.md, "Prefill semantics").

q [T, Hq, D] (rotated, as rope_kv_write returns it), packed by cu_seqlens int32 [B + 1];
block_tables int32 [B, max_pages]; kv_lens int32 [B]: tokens in the cache for sequence b after
this chunk, so its queries sit at positions kv_lens[b] - q_len .. kv_lens[b] - 1.

Triton: one program per (query block, sequence, kv head); its rows are (token, GQA head) pairs,
so the heads of a group share every K/V page load. One page per iteration. Like decode attention
(decode_attention.py), the codes are never dequantized element-wise: with k_hat = c * s + z per
token, q . k_hat = s * (q . c) + z * sum(q), and P V_hat = (P * s) C + P z, so the MMAs take the
raw codes (exact in fp16). KV4's low and high nibbles are the two halves of the head dimension:
q and the output are handled as two halves throughout.
"""

from __future__ import annotations

import math

import torch

from qoq.kernels.decode_attention import gather_kv_ref
from qoq.kernels.dispatch import dispatch, lazy_jit, output_like
from qoq.kernels.kv_cache import KVCacheLayer, token_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _check(q, cache, block_tables, cu_seqlens, kv_lens):
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q must be [T, Hq, {cache.head_dim}] with Hq a multiple of {cache.num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be [B + 1]")
    num_seqs = cu_seqlens.numel() - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or kv_lens.shape != (num_seqs,):
        raise ValueError("block_tables must be [B, max_pages] and kv_lens [B]")


def paged_prefill_attention_ref(q, cache: KVCacheLayer, block_tables, cu_seqlens, kv_lens, scale,
                                max_seqlen=None, out=None, options=None, work=None):
    """out rows of sequence b = causal softmax attention of its queries over its first kv_lens[b]
    cached tokens (query i at position kv_lens[b] - q_len + i). `work` (the Triton kernel's
    program list, prefill_work) changes nothing here."""
    _check(q, cache, block_tables, cu_seqlens, kv_lens)
    group = q.shape[1] // cache.num_kv_heads
    out = output_like(q, out)
    bounds, lens = cu_seqlens.tolist(), kv_lens.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        n, kv_len = end - start, lens[b]
        table = block_tables[b : b + 1, : -(-kv_len // cache.page_size)]
        # The same ops as prefill_attention_ref: with no earlier context and a KV16 cache in the
        # model's dtype, both give the same bits.
        ks = gather_kv_ref(cache, table, "k")[0, :, :kv_len].repeat_interleave(group, 0)  # [H, L, D]
        vs = gather_kv_ref(cache, table, "v")[0, :, :kv_len].repeat_interleave(group, 0)
        qs = q[start:end].float().transpose(0, 1)
        s = qs @ ks.transpose(1, 2) * scale
        causal = torch.ones(n, kv_len, dtype=torch.bool, device=q.device).triu(kv_len - n + 1)
        p = torch.softmax(s.masked_fill(causal, -math.inf), dim=-1)
        out[start:end] = (p @ vs).transpose(0, 1).to(q.dtype)
    return out


@lazy_jit.helper
def _page_halves(c_ptr, s_ptr, z_ptr, page, hk, HKV, n, j, PAGE: tl.constexpr, HALF: tl.constexpr,
                 BITS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """One page of K or V for kv head hk: the codes as two fp16 [PAGE, HALF] halves of the head
    dimension, and per-token scale and zero (fp32; 1 and 0 for a 16-bit cache).

    n: the page's token offsets [PAGE]; j: [HALF]. TRANSPOSED: the quantized V layout (kv_cache.py),
    byte (j, o) of the page-head block."""
    block = page * HKV + hk
    o = n[:, None]
    if BITS == 16:
        base = c_ptr + (block * PAGE + o) * (2 * HALF) + j[None, :]
        x1 = tl.load(base).to(tl.float16)
        x2 = tl.load(base + HALF).to(tl.float16)
        s = tl.full((PAGE,), 1.0, tl.float32)
        z = tl.zeros((PAGE,), tl.float32)
    else:
        W: tl.constexpr = HALF if BITS == 4 else 2 * HALF
        if TRANSPOSED:
            base = c_ptr + block * (W * PAGE) + j[None, :] * PAGE + o
            step = HALF * PAGE
        else:
            base = c_ptr + (block * PAGE + o) * W + j[None, :]
            step = HALF
        if BITS == 4:
            c = tl.load(base)
            x1 = (c & 15).to(tl.float16)
            x2 = (c >> 4).to(tl.float16)
        else:
            x1 = tl.load(base).to(tl.float16)
            x2 = tl.load(base + step).to(tl.float16)
        s = tl.load(s_ptr + block * PAGE + n).to(tl.float32)
        z = tl.load(z_ptr + block * PAGE + n).to(tl.float32)
    return x1, x2, s, z


@lazy_jit
def _paged_prefill_kernel(
    q_ptr, o_ptr, cu_ptr, len_ptr, bt_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, work_ptr,
    HQ, HKV, bt_stride, stride_q, sm_scale_log2,
    GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr, HALF: tl.constexpr,
    PAGE: tl.constexpr, BITS: tl.constexpr, WORK: tl.constexpr,
):
    if WORK:  # a list of (sequence, query block) per program, -1 past its end (prefill_work)
        b = tl.load(work_ptr + 2 * tl.program_id(0))
        if b < 0:
            return
        mb = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
    else:
        mb = tl.program_id(0)
        b = tl.program_id(1)
    hk = tl.program_id(2)
    start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - start
    if mb * TOKENS >= q_len:
        return
    kv_len = tl.load(len_ptr + b)
    ctx = kv_len - q_len  # tokens before this chunk
    r = tl.arange(0, ROWS)
    t = mb * TOKENS + r // GROUP  # the row's query token within the chunk
    row_mask = (r < TOKENS * GROUP) & (t < q_len)
    pos = ctx + t
    head = hk * GROUP + r % GROUP
    j = tl.arange(0, HALF)
    q_off = (start + t).to(tl.int64)[:, None] * stride_q + head[:, None] * (2 * HALF) + j[None, :]
    q1 = tl.load(q_ptr + q_off, mask=row_mask[:, None], other=0.0)
    q2 = tl.load(q_ptr + q_off + HALF, mask=row_mask[:, None], other=0.0)
    q_sum = tl.sum(q1.to(tl.float32), axis=1) + tl.sum(q2.to(tl.float32), axis=1)  # for the K zeros
    q1 = q1.to(tl.float16)
    q2 = q2.to(tl.float16)

    m_i = tl.full((ROWS,), -float("inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc1 = tl.zeros((ROWS, HALF), tl.float32)
    acc2 = tl.zeros((ROWS, HALF), tl.float32)
    n = tl.arange(0, PAGE)
    # Pages wholly at or before this block's first query need no mask; the rest (up to its last
    # query) are masked causally. Pages past a sequence's last query are never read.
    first = ctx + mb * TOKENS
    full = (first + 1) // PAGE
    last = tl.minimum(kv_len, first + TOKENS)
    for p in range(0, tl.cdiv(last, PAGE)):
        page = tl.load(bt_ptr + b * bt_stride + p).to(tl.int64)
        k1, k2, ks, kz = _page_halves(kc_ptr, ks_ptr, kz_ptr, page, hk, HKV, n, j, PAGE, HALF, BITS, False)
        s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        if BITS != 16:
            s = s * ks[None, :] + q_sum[:, None] * kz[None, :]
        s = s * sm_scale_log2
        key = p * PAGE + n
        if p >= full:
            s = tl.where(key[None, :] <= pos[:, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        v1, v2, vs, vz = _page_halves(vc_ptr, vs_ptr, vz_ptr, page, hk, HKV, n, j, PAGE, HALF, BITS, True)
        if BITS == 16:
            pv = prob.to(tl.float16)
            acc1 = tl.dot(pv, v1, acc1 * alpha[:, None])
            acc2 = tl.dot(pv, v2, acc2 * alpha[:, None])
        else:
            if p >= full:  # the tail of the last page may be stale: keep its scales out of the sums
                valid = key < kv_len
                vs = tl.where(valid, vs, 0.0)
                vz = tl.where(valid, vz, 0.0)
            pv = (prob * vs[None, :]).to(tl.float16)
            zsum = tl.sum(prob * vz[None, :], axis=1)[:, None]
            acc1 = tl.dot(pv, v1, acc1 * alpha[:, None]) + zsum
            acc2 = tl.dot(pv, v2, acc2 * alpha[:, None]) + zsum
        m_i = m_new
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (start + t).to(tl.int64)[:, None] * (HQ * 2 * HALF) + head[:, None] * (2 * HALF) + j[None, :]
    tl.store(o_ptr + o_off, (acc1 * inv).to(o_ptr.dtype.element_ty), mask=row_mask[:, None])
    tl.store(o_ptr + o_off + HALF, (acc2 * inv).to(o_ptr.dtype.element_ty), mask=row_mask[:, None])


def _options(group: int, cuda: bool, options: dict | None) -> tuple[dict, int, int]:
    """The launch options, rows per program and query tokens per program (rows // group)."""
    opts = dict(ROWS=128 if cuda else 16, num_warps=8 if cuda else 4, num_stages=2)
    opts.update(options or {})
    rows = max(opts["ROWS"], 1 << (group - 1).bit_length())
    return opts, rows, rows // group


def prefill_work(q_lens: list[int], group: int, cuda: bool, capacity: int | None = None,
                 options: dict | None = None) -> torch.Tensor:
    """The kernel's program list for chunks of these lengths: int32 [capacity, 2] rows of
    (sequence, query block), then (-1, -1) rows the kernel skips. With a list, the launch grid is
    `capacity` programs (per kv head) whatever the chunks, so a CUDA graph can hold the launch and
    a step changes only buffers; `capacity` must be at least the programs needed, which is at most
    ceil(sum(q_lens) / tokens) + len(q_lens) (tokens: query tokens per program)."""
    _, _, tokens = _options(group, cuda, options)
    pairs = [(b, mb) for b, n in enumerate(q_lens) for mb in range(-(-n // tokens))]
    capacity = len(pairs) if capacity is None else capacity
    if len(pairs) > capacity:
        raise ValueError(f"{len(pairs)} programs do not fit a work list of {capacity}")
    work = torch.full((capacity, 2), -1, dtype=torch.int32)
    if pairs:
        work[: len(pairs)] = torch.tensor(pairs, dtype=torch.int32)
    return work


def prefill_work_capacity(num_tokens: int, max_seqs: int, group: int, cuda: bool, options: dict | None = None) -> int:
    """The most programs any step of num_tokens query tokens over at most max_seqs chunks needs."""
    _, _, tokens = _options(group, cuda, options)
    return -(-num_tokens // tokens) + min(num_tokens, max_seqs)


def paged_prefill_attention_triton(q, cache: KVCacheLayer, block_tables, cu_seqlens, kv_lens, scale,
                                   max_seqlen=None, out=None, options=None, work=None):
    """options: ROWS (query rows per program, a power of two >= 16: tokens x GQA group), num_warps,
    num_stages, for tuning probes. work: int32 [capacity, 2] from prefill_work (same options), on
    q's device: one program per row, the grid independent of the chunks (CUDA graphs); without
    it, a program per (query block of the longest chunk, sequence)."""
    _check(q, cache, block_tables, cu_seqlens, kv_lens)
    t, hq, d = q.shape
    page = cache.page_size
    if d & (d - 1) or d < 32 or page & (page - 1) or page < 16:
        raise ValueError(f"the Triton paged prefill needs power-of-two head_dim >= 32 and page_size >= 16, "
                         f"got {d} and {page}")
    q = token_rows(q)
    out = output_like(q, out)
    if t == 0:
        return out
    group = hq // cache.num_kv_heads
    opts, rows, tokens = _options(group, q.is_cuda, options)
    meta = [cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero]
    meta = [m if m is not None else cache.k_cache for m in meta]
    if work is not None:
        if work.dim() != 2 or work.shape[1] != 2 or work.dtype != torch.int32:
            raise ValueError(f"work must be int32 [capacity, 2] (prefill_work), got {work.dtype} {tuple(work.shape)}")
        grid = (work.shape[0], 1, cache.num_kv_heads)
    else:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        grid = (triton.cdiv(max_seqlen, tokens), cu_seqlens.numel() - 1, cache.num_kv_heads)
    _paged_prefill_kernel[grid](
        q, out, cu_seqlens, kv_lens, block_tables, cache.k_cache, cache.v_cache, *meta,
        work if work is not None else cu_seqlens,
        hq, cache.num_kv_heads, block_tables.stride(0), q.stride(0), float(scale) * math.log2(math.e),
        GROUP=group, TOKENS=tokens, ROWS=rows, HALF=d // 2, PAGE=page, BITS=cache.bits, WORK=work is not None,
        num_warps=opts["num_warps"], num_stages=opts["num_stages"],
    )
    return out


paged_prefill_attention = dispatch(paged_prefill_attention_ref, paged_prefill_attention_triton)
