"""Decode attention over the paged KV cache (KV4, KV8 or fp16), GQA, variable context lengths.

Why it stays memory-bound (SPEC section 3): the kernel never dequantizes K or V element-wise.
With k_hat = c * s + z per token,  q . k_hat = s * (q . c) + z * sum(q),  so the scores come
from a tensor-core dot of q with the raw integer codes (exact in fp16) and two FMAs per token;
likewise  sum_t p_t v_hat_t = sum_t (p_t * s_t) c_t + sum_t p_t z_t,  so P is scaled per token
before the P @ codes dot. Per byte of KV4 the CUDA cores do an and/shift and an int->fp16
convert, nothing else. One program serves all query heads of a kv head (GQA group padded to
16 rows for the MMA), one 64-token page per iteration; long contexts are split across programs
(split-K, flash-decoding) and merged by a small second kernel using the log-sum-exp.
"""

from __future__ import annotations

import math

import torch

from qoq.kernels.dispatch import dispatch, lazy_jit
from qoq.kernels.kv_cache import KVCacheLayer, dequantize_kv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _check(q, cache, block_tables, context_lens):
    if q.dim() != 3 or q.shape[2] != cache.head_dim:
        raise ValueError(f"q must be [B, Hq, {cache.head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % cache.num_kv_heads:
        raise ValueError("num_q_heads must be a multiple of num_kv_heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError("block_tables must be [B, max_pages]")
    if context_lens.shape != (q.shape[0],):
        raise ValueError("context_lens must be [B]")


def gather_kv_ref(cache: KVCacheLayer, block_tables, which: str, dtype=torch.float32):
    """Dequantized K or V of every page in block_tables: [B, Hkv, max_pages * page_size, D]."""
    bt = block_tables.long().clamp_min(0)
    data = getattr(cache, f"{which}_cache")[bt]  # [B, P, Hkv, S, W]
    scale = zero = None
    if cache.bits != 16:
        scale = getattr(cache, f"{which}_scale")[bt]
        zero = getattr(cache, f"{which}_zero")[bt]
    x = dequantize_kv_ref(data, scale, zero, cache.bits, torch.float32)  # [B, P, Hkv, S, D]
    b, p, h, s, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b, h, p * s, d).to(dtype)


def paged_decode_attention_ref(q, cache: KVCacheLayer, block_tables, context_lens, scale,
                               num_splits=None, options=None):
    """out [B, Hq, D] = softmax(q k^T * scale) v over each sequence's first context_lens tokens."""
    _check(q, cache, block_tables, context_lens)
    k = gather_kv_ref(cache, block_tables, "k")
    v = gather_kv_ref(cache, block_tables, "v")
    group = q.shape[1] // cache.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    t = torch.arange(k.shape[2], device=q.device)
    scores = scores.masked_fill(t[None, None, :] >= context_lens[:, None, None].long(), -math.inf)
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, v).to(q.dtype)


@lazy_jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr,
    HQ, HKV, bt_stride, sm_scale_log2,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    BITS: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_T: tl.constexpr, MAGIC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    D: tl.constexpr = 2 * HALF
    W: tl.constexpr = HALF if BITS == 4 else D
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, HALF)
    t = tl.arange(0, BLOCK_T)
    g_mask = g < GROUP
    head = h * GROUP + g

    q_off = (b * HQ + head)[:, None] * D + j[None, :]
    q_lo = tl.load(q_ptr + q_off, mask=g_mask[:, None], other=0.0).to(tl.float16)
    q_hi = tl.load(q_ptr + q_off + HALF, mask=g_mask[:, None], other=0.0).to(tl.float16)
    q_sum = tl.sum(q_lo.to(tl.float32), axis=1) + tl.sum(q_hi.to(tl.float32), axis=1)

    ctx = tl.load(len_ptr + b)
    num_blocks = tl.cdiv(ctx, BLOCK_T)
    per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    blk_begin = split * per_split
    blk_end = tl.minimum(blk_begin + per_split, num_blocks)

    m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc_lo = tl.zeros((BLOCK_G, HALF), tl.float32)
    acc_hi = tl.zeros((BLOCK_G, HALF), tl.float32)
    z_acc = tl.zeros((BLOCK_G,), tl.float32)
    for blk in tl.range(blk_begin, blk_end, num_stages=NUM_STAGES):
        tok = blk * BLOCK_T + t
        if BLOCK_T == PAGE:
            # One page per iteration: one scalar page-table load, and unmasked loads (the tail
            # of the last page is allocated memory; its scores are masked below). The general
            # path's per-token gather and masks cost ~20% at KV8 on H100.
            page = tl.load(bt_ptr + b * bt_stride + blk).to(tl.int64)
            row = (page * HKV + h) * PAGE + t
            lm, lo, sm, so = None, None, None, None
        else:
            t_mask = tok < ctx
            page = tl.load(bt_ptr + b * bt_stride + tok // PAGE, mask=t_mask, other=0).to(tl.int64)
            row = (page * HKV + h) * PAGE + tok % PAGE  # [BLOCK_T]
            lm, lo, sm, so = t_mask[:, None], 0, t_mask, 0.0
        if BITS == 4:
            kb = tl.load(kc_ptr + row[:, None] * W + j[None, :], mask=lm, other=lo)
            vb = tl.load(vc_ptr + row[:, None] * W + j[None, :], mask=lm, other=lo)
            if MAGIC:
                # fp16 with exponent bits 0x6400 and the code in the mantissa is exactly
                # 1024 + code: two integer ops instead of an int->float conversion.
                k16 = kb.to(tl.int16)
                v16 = vb.to(tl.int16)
                k_lo = ((k16 & 0xF) | 0x6400).to(tl.float16, bitcast=True)
                k_hi = ((k16 >> 4) | 0x6400).to(tl.float16, bitcast=True)
                v_lo = ((v16 & 0xF) | 0x6400).to(tl.float16, bitcast=True)
                v_hi = ((v16 >> 4) | 0x6400).to(tl.float16, bitcast=True)
            else:
                k_lo = (kb & 0xF).to(tl.float16)
                k_hi = (kb >> 4).to(tl.float16)
                v_lo = (vb & 0xF).to(tl.float16)
                v_hi = (vb >> 4).to(tl.float16)
        else:
            k_lo = tl.load(kc_ptr + row[:, None] * W + j[None, :], mask=lm, other=lo)
            k_hi = tl.load(kc_ptr + row[:, None] * W + HALF + j[None, :], mask=lm, other=lo)
            v_lo = tl.load(vc_ptr + row[:, None] * W + j[None, :], mask=lm, other=lo)
            v_hi = tl.load(vc_ptr + row[:, None] * W + HALF + j[None, :], mask=lm, other=lo)
            if BITS == 8 and MAGIC:
                k_lo = (k_lo.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                k_hi = (k_hi.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                v_lo = (v_lo.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                v_hi = (v_hi.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
            else:
                k_lo = k_lo.to(tl.float16)
                k_hi = k_hi.to(tl.float16)
                v_lo = v_lo.to(tl.float16)
                v_hi = v_hi.to(tl.float16)
        s = tl.dot(q_lo, tl.trans(k_lo))
        s = tl.dot(q_hi, tl.trans(k_hi), s)  # [BLOCK_G, BLOCK_T]
        if BITS != 16:
            k_scale = tl.load(ks_ptr + row, mask=sm, other=so).to(tl.float32)
            k_zero = tl.load(kz_ptr + row, mask=sm, other=so).to(tl.float32)
            if MAGIC:
                k_zero = k_zero - 1024.0 * k_scale  # the codes came in as 1024 + code
            s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        s = s * sm_scale_log2
        s = tl.where((tok < ctx)[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        if BITS != 16:
            v_scale = tl.load(vs_ptr + row, mask=sm, other=so).to(tl.float32)
            v_zero = tl.load(vz_ptr + row, mask=sm, other=so).to(tl.float32)
            p16 = (prob * v_scale[None, :]).to(tl.float16)
            if MAGIC:  # remove the 1024 * sum(p * scale) that the biased codes add
                v_zero = v_zero[None, :] * prob - 1024.0 * p16.to(tl.float32)
                z_acc = z_acc * alpha + tl.sum(v_zero, axis=1)
            else:
                z_acc = z_acc * alpha + tl.sum(prob * v_zero[None, :], axis=1)
        else:
            p16 = prob.to(tl.float16)
        acc_lo = tl.dot(p16, v_lo, acc_lo)
        acc_hi = tl.dot(p16, v_hi, acc_hi)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_lo = (acc_lo + z_acc[:, None]) / l_safe[:, None]
    out_hi = (acc_hi + z_acc[:, None]) / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(o_ptr + q_off, out_lo.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
        tl.store(o_ptr + q_off + HALF, out_hi.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (b * HQ + head) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(o_ptr + part[:, None] * D + j[None, :], out_lo, mask=g_mask[:, None])
        tl.store(o_ptr + part[:, None] * D + HALF + j[None, :], out_hi, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), -float("inf"))
        tl.store(lse_ptr + part, lse, mask=g_mask)


@lazy_jit
def _merge_kernel(part_ptr, lse_ptr, o_ptr, NUM_SPLITS: tl.constexpr, D: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    s_mask = s < NUM_SPLITS
    lse = tl.load(lse_ptr + bh * NUM_SPLITS + s, mask=s_mask, other=-float("inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(lse > -float("inf"), tl.exp2(lse - m), 0.0)
    parts = tl.load(part_ptr + (bh * NUM_SPLITS + s)[:, None] * D + d[None, :],
                    mask=s_mask[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))


def _default_splits(batch, num_kv_heads, max_blocks, device):
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    target = 8 * sms  # programs: enough pages in flight to cover HBM latency
    splits = max(1, -(-target // (batch * num_kv_heads)))
    return min(splits, max(1, max_blocks // 2), 32)


# From the H100 sweeps (bench_attention.py --sweep, batch 64): one page per iteration on the
# scalar-page-table path is fastest; the 1024-biased fp16 "magic" conversion gave no speed and
# cost accuracy (the bias cancels against 1024 * sum(q) in fp32), so it stays off by default.
DEFAULT_OPTIONS = {4: dict(MAGIC=False, num_warps=4, NUM_STAGES=2),
                   8: dict(MAGIC=False, num_warps=4, NUM_STAGES=2),
                   16: dict(MAGIC=False, num_warps=4, NUM_STAGES=2)}


def paged_decode_attention_triton(q, cache: KVCacheLayer, block_tables, context_lens, scale,
                                  num_splits=None, options=None):
    _check(q, cache, block_tables, context_lens)
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    group = hq // hkv
    if d & (d - 1) or cache.page_size & (cache.page_size - 1):
        raise ValueError("the Triton decode needs power-of-two head_dim and page_size")
    q = q.contiguous()
    # BLOCK_T == page_size takes the fast one-page-per-iteration path
    opts = dict(DEFAULT_OPTIONS[cache.bits], BLOCK_T=max(16, cache.page_size))
    opts.update(options or {})
    max_blocks = -(-block_tables.shape[1] * cache.page_size // opts["BLOCK_T"])
    splits = num_splits or _default_splits(b, hkv, max_blocks, q.device)
    out = torch.empty_like(q)
    if splits == 1:
        part, lse = out, out
    else:
        part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    meta = [cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero]
    meta = [m if m is not None else cache.k_cache for m in meta]
    _decode_kernel[(b, hkv, splits)](
        q, cache.k_cache, cache.v_cache, *meta, block_tables, context_lens, part, lse,
        hq, hkv, block_tables.stride(0), float(scale) * math.log2(math.e),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HALF=d // 2,
        PAGE=cache.page_size, BITS=cache.bits, NUM_SPLITS=splits, NUM_STAGES=opts["NUM_STAGES"],
        BLOCK_T=opts["BLOCK_T"], MAGIC=opts["MAGIC"], num_warps=opts["num_warps"],
    )
    if splits > 1:
        _merge_kernel[(b * hq,)](part, lse, out, NUM_SPLITS=splits, D=d,
                                 BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


paged_decode_attention = dispatch(paged_decode_attention_ref, paged_decode_attention_triton)
