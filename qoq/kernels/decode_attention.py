"""Decode attention over the paged KV cache (KV4, KV8 or fp16), GQA, variable context lengths.

Why it stays memory-bound (docs/formats.md#decode-attention-on-codes): the kernel never dequantizes K or V element-wise.
With k_hat = c * s + z per token,  q . k_hat = s * (q . c) + z * sum(q),  so the scores come
from a tensor-core dot of q with the raw integer codes (exact in fp16) and two FMAs per token;
likewise  sum_t p_t v_hat_t = sum_t (p_t * s_t) c_t + sum_t p_t z_t,  so P is scaled per token
before the P @ codes dot. Per byte of KV4 the CUDA cores do an and/shift and an int->fp16
convert, nothing else. One program serves all query heads of a kv head (GQA group padded to
16 rows for the MMA), one 64-token page per iteration; long contexts are split across programs
(split-K, flash-decoding); the last split of each sequence and kv head to finish merges them by
their log-sum-exp in the same launch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from qoq.kernels import configs
from qoq.kernels.dispatch import arrival_counters, dispatch, lazy_jit, output_like, pdl_enter, pdl_launch
from qoq.kernels.kv_cache import (
    KVAppend,
    KVCacheLayer,
    append_kv_head,
    check_rope,
    dequantize_kv_ref,
    hadamard_halves,
    rope_kv_write_ref,
    token_rows,
)

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
    data = cache.codes(which)[bt]  # [B, P, Hkv, S, W]
    scale = zero = None
    if cache.bits != 16:
        scale = getattr(cache, f"{which}_scale")[bt]
        zero = getattr(cache, f"{which}_zero")[bt]
    x = dequantize_kv_ref(data, scale, zero, cache.bits, torch.float32)  # [B, P, Hkv, S, D]
    b, p, h, s, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b, h, p * s, d).to(dtype)


def paged_decode_attention_ref(q, cache: KVCacheLayer, block_tables, context_lens, scale,
                               num_splits=None, options=None, out=None, append: KVAppend | None = None):
    """out [B, Hq, D] = softmax(q k^T * scale) v over each sequence's first context_lens tokens.
    append: the step's new keys and values, rotated and written into the cache first (q unrotated),
    as `rope_kv_write` would."""
    _check(q, cache, block_tables, context_lens)
    if append is not None:
        q, _ = rope_kv_write_ref(q, append.k, append.v, append.positions, append.cos_sin_cache, append.slot_mapping,
                                 cache)
    k = gather_kv_ref(cache, block_tables, "k")
    v = gather_kv_ref(cache, block_tables, "v")
    group = q.shape[1] // cache.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    t = torch.arange(k.shape[2], device=q.device)
    scores = scores.masked_fill(t[None, None, :] >= context_lens[:, None, None].long(), -math.inf)
    p = torch.softmax(scores, dim=-1)
    result = torch.einsum("bht,bhtd->bhd", p, v).to(q.dtype)
    return result if out is None else output_like(q, out).copy_(result)


# Inline PTX for the fast code -> fp16 unpack (pack=4: one 32-bit word of 4 code bytes per call).
# KV4: a byte permute spreads 2 bytes into the two fp16 lanes, (w & mask) | 0x6400 is the fp16
# 1024 + lo (or 1024 + 16 * hi) exactly, and a packed fp16 subtract removes the 1024.
_KV4_ASM = """{
        .reg .b32 a, b, m;
        mov.b32 m, 0x64006400;
        prmt.b32 a, $4, 0, 0x4140;
        prmt.b32 b, $4, 0, 0x4342;
        lop3.b32 $0, a, 0x000F000F, m, 0xEA;
        lop3.b32 $1, b, 0x000F000F, m, 0xEA;
        lop3.b32 $2, a, 0x00F000F0, m, 0xEA;
        lop3.b32 $3, b, 0x00F000F0, m, 0xEA;
        sub.f16x2 $0, $0, m;
        sub.f16x2 $1, $1, m;
        sub.f16x2 $2, $2, m;
        sub.f16x2 $3, $3, m;
        }"""
# KV8: the permute puts each code byte under an fp16 exponent byte 0x64 (= 1024 + code).
_KV8_ASM = """{
        .reg .b32 m;
        mov.b32 m, 0x64006400;
        prmt.b32 $0, $4, m, 0x7170;
        prmt.b32 $1, $4, m, 0x7372;
        prmt.b32 $2, $5, m, 0x7170;
        prmt.b32 $3, $5, m, 0x7372;
        sub.f16x2 $0, $0, m;
        sub.f16x2 $1, $1, m;
        sub.f16x2 $2, $2, m;
        sub.f16x2 $3, $3, m;
        }"""
# The same without the bias subtraction, for K (BIASED): the codes arrive as fp16 1024 + code (KV4
# high nibbles: 1024 + 16 * code), and the kernel takes the bias off each score once per row:
# q . (k + 1024) = q . k + 1024 * sum(q). Per page the scores come from a fresh MMA over one head
# dimension, so the bias costs little precision. V biased too (DecodePlan.biased_v) saves the
# unpack's four subtractions per word, but only with each page's bias, 1024 * sum_t p16_t (a
# column sum of the fp16 P that the MMA takes), subtracted from the accumulator before the page's
# MMA adds it back: left in the accumulator over the whole context, the tensor cores' fp32 adds
# on top of a bias ~140x the signal (1024 against a mean code of 7.5) broke the 3e-3 tolerance at
# context 4096 on the H100.
_KV4_BIASED_ASM = "\n".join(line for line in _KV4_ASM.splitlines() if "sub.f16x2" not in line)
_KV8_BIASED_ASM = "\n".join(line for line in _KV8_ASM.splitlines() if "sub.f16x2" not in line)
MERGE_UNROLL = 4  # the split merge loads this many splits' partial outputs at once
if tl is not None:  # Triton kernels read globals only as constexpr
    MERGE_UNROLL = tl.constexpr(MERGE_UNROLL)
    _KV4_ASM, _KV8_ASM = tl.constexpr(_KV4_ASM), tl.constexpr(_KV8_ASM)
    _KV4_BIASED_ASM, _KV8_BIASED_ASM = tl.constexpr(_KV4_BIASED_ASM), tl.constexpr(_KV8_BIASED_ASM)


@lazy_jit.helper
def _block_rows(bt_ptr, b, bt_stride, blk, h, ctx, HKV, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
                W: tl.constexpr):
    """Cache rows of the BLOCK_T tokens of iteration `blk` (K codes / scales, token-major) and the
    offset of each token's first byte in the transposed V^T page block.

    Whole pages, or whole fractions of one, per iteration (page_size and BLOCK_T are powers of two):
    page-table loads per page, not per token, and no masks on the KV loads (a tail past the context
    is allocated memory: the rest of the last page, page 0 for pages past it; its scores are masked
    by the kernel). A per-token gather with masks cost ~20% at KV8 on H100."""
    t = tl.arange(0, BLOCK_T)
    if BLOCK_T <= PAGE:
        SUB: tl.constexpr = PAGE // BLOCK_T
        page = tl.load(bt_ptr + b * bt_stride + blk // SUB).to(tl.int64)
        row = (page * HKV + h) * PAGE + (blk % SUB) * BLOCK_T + t
        # V codes are stored transposed per page (kv_cache.py): byte (j, o) of the page-head
        # block. Written as block start + token so that the compiler sees tokens contiguous.
        v_tok = (page * HKV + h) * (PAGE * W) + (blk % SUB) * BLOCK_T + t
    else:
        PAGES: tl.constexpr = BLOCK_T // PAGE
        pi = blk * PAGES + tl.arange(0, PAGES)
        pages = tl.load(bt_ptr + b * bt_stride + pi, mask=pi * PAGE < ctx, other=0).to(tl.int64)
        o = tl.arange(0, PAGE)[None, :]
        row = tl.reshape((pages[:, None] * HKV + h) * PAGE + o, (BLOCK_T,))
        v_tok = tl.reshape((pages[:, None] * HKV + h) * (PAGE * W) + o, (BLOCK_T,))
    return row, v_tok


@lazy_jit.helper
def _kv4_codes(x, FAST: tl.constexpr, BIASED: tl.constexpr, HI16: tl.constexpr):
    """KV4 code bytes -> fp16 (low nibbles, high nibbles). HI16: the high codes come multiplied
    by 16 (the word-wide unpack's form; exact). BIASED: both come as 1024 + code (K only)."""
    if FAST:
        # 1.25 ops per code (_KV4_ASM; 0.75 BIASED) instead of a per-element int->fp16
        # conversion, a quarter-rate instruction that bound the loop.
        asm: tl.constexpr = _KV4_BIASED_ASM if BIASED else _KV4_ASM
        lo, hi = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [x], (tl.float16, tl.float16), True, 4)
    elif BIASED:  # the biased unpack's values, element-wise: the interpreter tests the algebra
        lo = (x & 0xF).to(tl.float16) + 1024.0
        hi = (x & 0xF0).to(tl.float16) + 1024.0
    elif HI16:
        lo = (x & 0xF).to(tl.float16)
        hi = (x & 0xF0).to(tl.float16)
    else:
        lo = (x & 0xF).to(tl.float16)
        hi = (x >> 4).to(tl.float16)
    return lo, hi


@lazy_jit.helper
def _kv8_codes(lo, hi, FAST: tl.constexpr, BIASED: tl.constexpr):
    """KV8 code bytes (two halves of the head dimension) -> fp16; BIASED: as 1024 + code."""
    if FAST:
        asm: tl.constexpr = _KV8_BIASED_ASM if BIASED else _KV8_ASM
        lo, hi = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r", [lo, hi], (tl.float16, tl.float16), True, 4)
    elif BIASED:
        lo = lo.to(tl.float16) + 1024.0
        hi = hi.to(tl.float16) + 1024.0
    else:
        lo = lo.to(tl.float16)
        hi = hi.to(tl.float16)
    return lo, hi


@lazy_jit.helper
def _load_q(q_ptr, b, HQ, head, g_mask, j, D: tl.constexpr, HALF: tl.constexpr, HI16: tl.constexpr,
            TRANS: tl.constexpr, stride_q, pos_ptr, cs_ptr, APPEND: tl.constexpr, HADAMARD: tl.constexpr):
    """The query rows `head` of sequence b as fp16 halves of the head dimension, [BLOCK_G, HALF]
    (TRANS: q^T, [HALF, BLOCK_G]), with the output's offsets of them, each head's sum(q) (the
    zero-point term) and 1024 * sum(q) after the HI16 scaling (what biased K codes, 1024 + code,
    add to each score). HI16: the fast unpack yields 16 * (high code), so q_hi comes pre-divided
    by 16 (exact). APPEND (`KVAppend`): q comes unrotated, rows stride_q apart; RoPE at the
    token's position (and x H: HADAMARD) here, rounded to q's dtype as `rope_kv_write` returns it."""
    if TRANS:
        q_off = (b * HQ + head)[None, :] * D + j[:, None]
        mask = g_mask[None, :]
    else:
        q_off = (b * HQ + head)[:, None] * D + j[None, :]
        mask = g_mask[:, None]
    AXIS: tl.constexpr = 0 if TRANS else 1
    if APPEND:
        x_off = b.to(tl.int64) * stride_q + (q_off - b * HQ * D)
        pos = tl.load(pos_ptr + b)
        cos = tl.load(cs_ptr + pos * D + j).to(tl.float32)
        sin = tl.load(cs_ptr + pos * D + HALF + j).to(tl.float32)
        cos = cos[:, None] if TRANS else cos[None, :]
        sin = sin[:, None] if TRANS else sin[None, :]
        x1 = tl.load(q_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(q_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        a1 = x1 * cos - x2 * sin
        a2 = x2 * cos + x1 * sin
        if HADAMARD:
            a1, a2 = hadamard_halves(a1, a2, HALF, False, TRANS)
        q_lo = a1.to(q_ptr.dtype.element_ty).to(tl.float16)
        q_hi = a2.to(q_ptr.dtype.element_ty).to(tl.float16)
    else:
        q_lo = tl.load(q_ptr + q_off, mask=mask, other=0.0).to(tl.float16)
        q_hi = tl.load(q_ptr + q_off + HALF, mask=mask, other=0.0).to(tl.float16)
    q_sum = tl.sum(q_lo.to(tl.float32), axis=AXIS) + tl.sum(q_hi.to(tl.float32), axis=AXIS)
    if HI16:
        q_hi = q_hi * 0.0625
    k_bias = 1024.0 * (tl.sum(q_lo.to(tl.float32), axis=AXIS) + tl.sum(q_hi.to(tl.float32), axis=AXIS))
    return q_off, q_lo, q_hi, q_sum, k_bias


@lazy_jit.helper
def _append(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, ctx,
            blk_begin, blk_end, HKV, stride_k, stride_v, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
            HALF: tl.constexpr, BITS: tl.constexpr, HADAMARD: tl.constexpr, FENCE: tl.constexpr):
    """`KVAppend`: the program whose blocks hold the context's last token (the step's new one)
    writes its key and value of kv head h into the cache before any of its page loads; no other
    program reads that token in this launch. FENCE (CUDA): the stores are made visible at GPU scope
    (in L2, where the page's asynchronous copies read) before the barrier."""
    if (blk_begin * BLOCK_T < ctx) & (ctx <= blk_end * BLOCK_T):
        append_kv_head(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h,
                       HKV, PAGE, stride_k, stride_v, HALF, BITS, HADAMARD, False)
        if FENCE:
            tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0 $1", "=r,r", [h], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()  # the program's other warps read the page after the write


@lazy_jit.helper
def _split_blocks(len_ptr, b, split, num_splits, BLOCK_T: tl.constexpr, MIN_BLOCKS: tl.constexpr):
    """Sequence b's context length, the [begin, end) of the BLOCK_T-token blocks that split
    `split` of `num_splits` covers (at least MIN_BLOCKS of them), and how many splits hold blocks
    (the first ones: a short context under a launch sized for the longest leaves the rest empty)."""
    ctx = tl.load(len_ptr + b)
    num_blocks = tl.cdiv(ctx, BLOCK_T)
    per_split = tl.maximum(tl.cdiv(num_blocks, num_splits), MIN_BLOCKS)
    blk_begin = split * per_split
    return ctx, blk_begin, tl.minimum(blk_begin + per_split, num_blocks), tl.cdiv(num_blocks, per_split)


@lazy_jit.helper
def _finish_split(part_ptr, lse_ptr, o_ptr, cnt_ptr, m_i, l_safe, l_i, b, h, split, head, g_mask, num_splits, used,
                  HQ, HKV, D: tl.constexpr, HALF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Split-K in one launch, after a split stored its partial output: store its log-sum-exp and
    arrive at the (sequence, kv head) counter (acq_rel); the last split to arrive merges the
    partial outputs of the `used` splits that hold blocks by their log-sum-exps, in split order
    (deterministic), into the output rows of `head`, and resets the counter for the next call.
    The partials are read MERGE_UNROLL splits at a time, so their L2 round trips overlap."""
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), -float("inf"))
    tl.store(lse_ptr + (b * HQ + head) * num_splits + split, lse, mask=g_mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + b * HKV + h, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        j = tl.arange(0, HALF)
        q_off = (b * HQ + head)[:, None] * D + j[None, :]
        sp = tl.arange(0, BLOCK_S)
        first = (b * HQ + head) * num_splits  # [BLOCK_G]
        lse_all = tl.load(lse_ptr + first[:, None] + sp[None, :],
                          mask=g_mask[:, None] & (sp < num_splits)[None, :], other=-float("inf"),
                          cache_modifier=".cg")
        m_all = tl.max(lse_all, axis=1)
        m_safe = tl.where(m_all > -float("inf"), m_all, 0.0)
        w_all = tl.where(lse_all > -float("inf"), tl.exp2(lse_all - m_safe[:, None]), 0.0)
        w_sum = tl.sum(w_all, axis=1)
        m_lo = tl.zeros((BLOCK_G, HALF), tl.float32)
        m_hi = tl.zeros((BLOCK_G, HALF), tl.float32)
        for c in range(0, used, MERGE_UNROLL):
            for u in tl.static_range(MERGE_UNROLL):
                i = c + u
                w_i = tl.sum(tl.where(sp[None, :] == i, w_all, 0.0), axis=1)[:, None]
                p_off = (first + i)[:, None] * D + j[None, :]
                p_mask = g_mask[:, None] & (i < used)
                m_lo += w_i * tl.load(part_ptr + p_off, mask=p_mask, other=0.0, cache_modifier=".cg")
                m_hi += w_i * tl.load(part_ptr + p_off + HALF, mask=p_mask, other=0.0, cache_modifier=".cg")
        w_den = tl.where(w_sum > 0, w_sum, 1.0)[:, None]
        tl.store(o_ptr + q_off, (m_lo / w_den).to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
        tl.store(o_ptr + q_off + HALF, (m_hi / w_den).to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
        tl.atomic_xchg(cnt_ptr + b * HKV + h, 0, sem="relaxed", scope="gpu")


@lazy_jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_ptr, len_ptr, o_ptr, part_ptr, lse_ptr, cnt_ptr,
    HQ, HKV, bt_stride, sm_scale_log2, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    BITS: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_T: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr, BIASED: tl.constexpr,
    PDL: tl.constexpr = False, MIN_BLOCKS: tl.constexpr = 1, BIASED_V: tl.constexpr = False,
    k_ptr=None, v_ptr=None, pos_ptr=None, cs_ptr=None, slot_ptr=None, stride_q=0, stride_k=0, stride_v=0,
    APPEND: tl.constexpr = False, HADAMARD: tl.constexpr = False, FENCE: tl.constexpr = False,
):
    """num_splits is a runtime value (SPLIT: more than one), so the batch sizes that a serving
    run passes through, each with its own split count, share one compiled kernel.

    FAST: the codes are unpacked to fp16 by inline PTX (CUDA only). BIASED (KV4 / KV8): the K
    codes stay 1024 + code, and the bias comes off each score row (`_KV4_BIASED_ASM`); off CUDA
    the same biased values are computed element-wise, so the interpreter tests the algebra."""
    pdl_enter(PDL)
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

    HI16: tl.constexpr = BITS == 4 and (FAST or BIASED)
    q_off, q_lo, q_hi, q_sum, k_bias = _load_q(q_ptr, b, HQ, head, g_mask, j, D, HALF, HI16, False, stride_q,
                                               pos_ptr, cs_ptr, APPEND, HADAMARD)

    ctx, blk_begin, blk_end, used = _split_blocks(len_ptr, b, split, num_splits, BLOCK_T, MIN_BLOCKS)
    if APPEND:
        _append(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, ctx,
                blk_begin, blk_end, HKV, stride_k, stride_v, PAGE, BLOCK_T, HALF, BITS, HADAMARD, FENCE)

    m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc_lo = tl.zeros((BLOCK_G, HALF), tl.float32)
    acc_hi = tl.zeros((BLOCK_G, HALF), tl.float32)
    z_acc = tl.zeros((BLOCK_G,), tl.float32)
    for blk in tl.range(blk_begin, blk_end, num_stages=NUM_STAGES):
        tok = blk * BLOCK_T + t
        row, v_tok = _block_rows(bt_ptr, b, bt_stride, blk, h, ctx, HKV, PAGE, BLOCK_T, W)
        v_off = v_tok[:, None] + j[None, :] * PAGE
        if BITS == 4:
            # The high codes stay multiplied by 16 (HI16): q_hi was pre-divided by 16 and the
            # V high-half accumulator is divided by 16 at the end (both exact).
            k_lo, k_hi = _kv4_codes(tl.load(kc_ptr + row[:, None] * W + j[None, :]), FAST, BIASED, HI16)
            v_lo, v_hi = _kv4_codes(tl.load(vc_ptr + v_off), FAST, BIASED_V, HI16)
        else:
            k_lo = tl.load(kc_ptr + row[:, None] * W + j[None, :])
            k_hi = tl.load(kc_ptr + row[:, None] * W + HALF + j[None, :])
            if BITS == 8:
                v_lo, v_hi = _kv8_codes(tl.load(vc_ptr + v_off), tl.load(vc_ptr + v_off + HALF * PAGE), FAST,
                                        BIASED_V)
                k_lo, k_hi = _kv8_codes(k_lo, k_hi, FAST, BIASED)
            else:
                v_lo = tl.load(vc_ptr + row[:, None] * W + j[None, :]).to(tl.float16)
                v_hi = tl.load(vc_ptr + row[:, None] * W + HALF + j[None, :]).to(tl.float16)
                k_lo = k_lo.to(tl.float16)
                k_hi = k_hi.to(tl.float16)
        s = tl.dot(q_lo, tl.trans(k_lo))
        s = tl.dot(q_hi, tl.trans(k_hi), s)  # [BLOCK_G, BLOCK_T]
        if BIASED:
            # the softmax scale rides on the per-token vectors: one op per score fewer
            k_scale = tl.load(ks_ptr + row).to(tl.float32) * sm_scale_log2
            k_zero = tl.load(kz_ptr + row).to(tl.float32) * sm_scale_log2
            s = (s - k_bias[:, None]) * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        else:
            if BITS != 16:
                k_scale = tl.load(ks_ptr + row).to(tl.float32)
                k_zero = tl.load(kz_ptr + row).to(tl.float32)
                s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
            s = s * sm_scale_log2
        if blk * BLOCK_T + BLOCK_T > ctx:  # only the block holding the context's end has tokens past it
            s = tl.where((tok < ctx)[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        if BITS != 16:
            v_scale = tl.load(vs_ptr + row).to(tl.float32)
            v_zero = tl.load(vz_ptr + row).to(tl.float32)
            p16 = (prob * v_scale[None, :]).to(tl.float16)
            z_acc = z_acc * alpha + tl.sum(prob * v_zero[None, :], axis=1)
        else:
            p16 = prob.to(tl.float16)
        if BIASED_V:  # the page's V bias comes off the accumulator before its MMA adds it back
            bias = -1024.0 * tl.sum(p16.to(tl.float32), axis=1)
            acc_lo = tl.dot(p16, v_lo, tl.fma(acc_lo, alpha[:, None], bias[:, None]))
            acc_hi = tl.dot(p16, v_hi, tl.fma(acc_hi, alpha[:, None], bias[:, None]))
        else:
            acc_lo = tl.dot(p16, v_lo, acc_lo * alpha[:, None])
            acc_hi = tl.dot(p16, v_hi, acc_hi * alpha[:, None])
        m_i = m_new

    if HI16:
        acc_hi = acc_hi * 0.0625
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_lo = (acc_lo + z_acc[:, None]) / l_safe[:, None]
    out_hi = (acc_hi + z_acc[:, None]) / l_safe[:, None]
    if not SPLIT:
        tl.store(o_ptr + q_off, out_lo.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
        tl.store(o_ptr + q_off + HALF, out_hi.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # Split-K in one launch: every split stores its partial output and log-sum-exp; the last
        # split of this (sequence, kv head) to arrive at its counter (acq_rel) merges them all
        # in split order (deterministic) and resets the counter for the next call.
        part = (b * HQ + head) * num_splits + split  # [BLOCK_G]
        tl.store(part_ptr + part[:, None] * D + j[None, :], out_lo, mask=g_mask[:, None])
        tl.store(part_ptr + part[:, None] * D + HALF + j[None, :], out_hi, mask=g_mask[:, None])
        _finish_split(part_ptr, lse_ptr, o_ptr, cnt_ptr, m_i, l_safe, l_i, b, h, split, head, g_mask, num_splits, used,
                      HQ, HKV, D, HALF, BLOCK_G, BLOCK_S)


@lazy_jit.helper
def _scores_t(kc_ptr, ks_ptr, kz_ptr, bt_ptr, b, bt_stride, blk, h, ctx, HKV, q_lo, q_hi, q_sum, k_bias,
              sm_scale_log2, PAGE: tl.constexpr, BLOCK_T: tl.constexpr, W: tl.constexpr, HALF: tl.constexpr,
              BITS: tl.constexpr, FAST: tl.constexpr, BIASED: tl.constexpr, HI16: tl.constexpr):
    """`_decode_kernel_t`'s scores of block `blk`, S^T [BLOCK_T, BLOCK_G], log2-scaled, masked past ctx."""
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, HALF)
    row, _ = _block_rows(bt_ptr, b, bt_stride, blk, h, ctx, HKV, PAGE, BLOCK_T, W)
    kb = tl.load(kc_ptr + row[:, None] * W + j[None, :])
    if BITS == 4:
        k_lo, k_hi = _kv4_codes(kb, FAST, BIASED, HI16)
    else:
        kb_hi = tl.load(kc_ptr + row[:, None] * W + HALF + j[None, :])
        if BITS == 8:
            k_lo, k_hi = _kv8_codes(kb, kb_hi, FAST, BIASED)
        else:
            k_lo, k_hi = kb.to(tl.float16), kb_hi.to(tl.float16)
    s = tl.dot(k_lo, q_lo)
    s = tl.dot(k_hi, q_hi, s)
    if BIASED:
        k_scale = tl.load(ks_ptr + row).to(tl.float32) * sm_scale_log2
        k_zero = tl.load(kz_ptr + row).to(tl.float32) * sm_scale_log2
        s = (s - k_bias[None, :]) * k_scale[:, None] + k_zero[:, None] * q_sum[None, :]
    else:
        if BITS != 16:
            k_scale = tl.load(ks_ptr + row).to(tl.float32)
            k_zero = tl.load(kz_ptr + row).to(tl.float32)
            s = s * k_scale[:, None] + k_zero[:, None] * q_sum[None, :]
        s = s * sm_scale_log2
    if blk * BLOCK_T + BLOCK_T > ctx:  # only the block holding the context's end has tokens past it
        s = tl.where((blk * BLOCK_T + t < ctx)[:, None], s, -float("inf"))
    return s


@lazy_jit.helper
def _values_t(vc_ptr, bt_ptr, b, bt_stride, blk, h, ctx, HKV, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
              W: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr, BIASED_V: tl.constexpr,
              HI16: tl.constexpr):
    """`_decode_kernel_t`'s V^T codes of block `blk` as fp16 halves [HALF, BLOCK_T], with the
    block's cache rows (for its scales)."""
    j = tl.arange(0, HALF)
    row, v_tok = _block_rows(bt_ptr, b, bt_stride, blk, h, ctx, HKV, PAGE, BLOCK_T, W)
    vt_off = v_tok[None, :] + j[:, None] * PAGE  # V^T [HALF, BLOCK_T]
    if BITS == 4:
        v_lo, v_hi = _kv4_codes(tl.load(vc_ptr + vt_off), FAST, BIASED_V, HI16)
    elif BITS == 8:
        v_lo, v_hi = _kv8_codes(tl.load(vc_ptr + vt_off), tl.load(vc_ptr + vt_off + HALF * PAGE), FAST, BIASED_V)
    else:
        v_lo = tl.load(vc_ptr + row[None, :] * W + j[:, None]).to(tl.float16)
        v_hi = tl.load(vc_ptr + row[None, :] * W + HALF + j[:, None]).to(tl.float16)
    return row, v_lo, v_hi


@lazy_jit.helper
def _store_t(o_ptr, part_ptr, lse_ptr, cnt_ptr, acc_lo, acc_hi, z_acc, m_i, l_i, q_off, b, h, split, head, g_mask, j,
             num_splits, used, HQ, HKV, D: tl.constexpr, HALF: tl.constexpr, BLOCK_G: tl.constexpr,
             BLOCK_S: tl.constexpr, HI16: tl.constexpr, SPLIT: tl.constexpr):
    """The transposed kernels' end: O^T = (acc + z) / l stored as the output rows of `head`, or
    as this split's partial output, merged by the last split to arrive (`_finish_split`)."""
    if HI16:
        acc_hi = acc_hi * 0.0625
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_lo = (acc_lo + z_acc[None, :]) / l_safe[None, :]
    out_hi = (acc_hi + z_acc[None, :]) / l_safe[None, :]
    if not SPLIT:
        tl.store(o_ptr + q_off, out_lo.to(o_ptr.dtype.element_ty), mask=g_mask[None, :])
        tl.store(o_ptr + q_off + HALF, out_hi.to(o_ptr.dtype.element_ty), mask=g_mask[None, :])
    else:
        part = (b * HQ + head) * num_splits + split  # [BLOCK_G]
        tl.store(part_ptr + part[None, :] * D + j[:, None], out_lo, mask=g_mask[None, :])
        tl.store(part_ptr + part[None, :] * D + HALF + j[:, None], out_hi, mask=g_mask[None, :])
        _finish_split(part_ptr, lse_ptr, o_ptr, cnt_ptr, m_i, l_safe, l_i, b, h, split, head, g_mask, num_splits, used,
                      HQ, HKV, D, HALF, BLOCK_G, BLOCK_S)


@lazy_jit
def _decode_kernel_t(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_ptr, len_ptr, o_ptr, part_ptr, lse_ptr, cnt_ptr,
    HQ, HKV, bt_stride, sm_scale_log2, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    BITS: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_T: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr, BIASED: tl.constexpr,
    PDL: tl.constexpr = False, MIN_BLOCKS: tl.constexpr = 1, BIASED_V: tl.constexpr = False,
    k_ptr=None, v_ptr=None, pos_ptr=None, cs_ptr=None, slot_ptr=None, stride_q=0, stride_k=0, stride_v=0,
    APPEND: tl.constexpr = False, HADAMARD: tl.constexpr = False, FENCE: tl.constexpr = False,
    SKEW: tl.constexpr = False,
):
    """`_decode_kernel` transposed: the tokens are the MMA's M and the GQA group its N.

    S^T = K q^T ([BLOCK_T, BLOCK_G]) and O^T = V^T P^T ([D, BLOCK_G]): the group pads to the
    8 columns of an m16n8 MMA instead of 16 rows, so the accumulators, the scores and the softmax
    hold half (group 4: a quarter) of what the row-major kernel holds, and the MMAs per page halve.
    V^T is the page's stored layout (codes transposed per page), read as the A operand directly."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    D: tl.constexpr = 2 * HALF
    W: tl.constexpr = HALF if BITS == 4 else D
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, HALF)
    g_mask = g < GROUP
    head = h * GROUP + g

    HI16: tl.constexpr = BITS == 4 and (FAST or BIASED)
    q_off, q_lo, q_hi, q_sum, k_bias = _load_q(q_ptr, b, HQ, head, g_mask, j, D, HALF, HI16, True, stride_q,
                                               pos_ptr, cs_ptr, APPEND, HADAMARD)  # q^T

    ctx, blk_begin, blk_end, used = _split_blocks(len_ptr, b, split, num_splits, BLOCK_T, MIN_BLOCKS)
    if APPEND:
        _append(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, ctx,
                blk_begin, blk_end, HKV, stride_k, stride_v, PAGE, BLOCK_T, HALF, BITS, HADAMARD, FENCE)

    m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc_lo = tl.zeros((HALF, BLOCK_G), tl.float32)
    acc_hi = tl.zeros((HALF, BLOCK_G), tl.float32)
    z_acc = tl.zeros((BLOCK_G,), tl.float32)
    if SKEW:  # the first block's scores ahead of the loop (an empty split reads no page)
        s_next = tl.zeros((BLOCK_T, BLOCK_G), tl.float32)
        if blk_begin < blk_end:
            s_next = _scores_t(kc_ptr, ks_ptr, kz_ptr, bt_ptr, b, bt_stride, blk_begin, h, ctx, HKV, q_lo, q_hi, q_sum,
                               k_bias, sm_scale_log2, PAGE, BLOCK_T, W, HALF, BITS, FAST, BIASED, HI16)
    for blk in tl.range(blk_begin, blk_end, num_stages=NUM_STAGES):
        if SKEW:  # this block's scores came from the last iteration; the next block's go alongside its softmax
            s = s_next
            s_next = _scores_t(kc_ptr, ks_ptr, kz_ptr, bt_ptr, b, bt_stride, tl.minimum(blk + 1, blk_end - 1), h, ctx,
                               HKV, q_lo, q_hi, q_sum, k_bias, sm_scale_log2, PAGE, BLOCK_T, W, HALF, BITS, FAST,
                               BIASED, HI16)
        else:
            s = _scores_t(kc_ptr, ks_ptr, kz_ptr, bt_ptr, b, bt_stride, blk, h, ctx, HKV, q_lo, q_hi, q_sum, k_bias,
                          sm_scale_log2, PAGE, BLOCK_T, W, HALF, BITS, FAST, BIASED, HI16)
        row, v_lo, v_hi = _values_t(vc_ptr, bt_ptr, b, bt_stride, blk, h, ctx, HKV, PAGE, BLOCK_T, W, HALF, BITS, FAST,
                                    BIASED_V, HI16)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(prob, axis=0)
        if BITS != 16:
            v_scale = tl.load(vs_ptr + row).to(tl.float32)
            v_zero = tl.load(vz_ptr + row).to(tl.float32)
            p16 = (prob * v_scale[:, None]).to(tl.float16)
            z_acc = z_acc * alpha + tl.sum(prob * v_zero[:, None], axis=0)
        else:
            p16 = prob.to(tl.float16)
        if BIASED_V:
            bias = -1024.0 * tl.sum(p16.to(tl.float32), axis=0)
            acc_lo = tl.dot(v_lo, p16, tl.fma(acc_lo, alpha[None, :], bias[None, :]))  # O^T [HALF, BLOCK_G]
            acc_hi = tl.dot(v_hi, p16, tl.fma(acc_hi, alpha[None, :], bias[None, :]))
        else:
            acc_lo = tl.dot(v_lo, p16, acc_lo * alpha[None, :])  # O^T [HALF, BLOCK_G]
            acc_hi = tl.dot(v_hi, p16, acc_hi * alpha[None, :])
        m_i = m_new

    _store_t(o_ptr, part_ptr, lse_ptr, cnt_ptr, acc_lo, acc_hi, z_acc, m_i, l_i, q_off, b, h, split, head, g_mask, j,
             num_splits, used, HQ, HKV, D, HALF, BLOCK_G, BLOCK_S, HI16, SPLIT)


@lazy_jit
def _decode_kernel_c(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_ptr, len_ptr, o_ptr, part_ptr, lse_ptr, cnt_ptr,
    HQ, HKV, bt_stride, sm_scale_log2, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    BITS: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_T: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr, BIASED: tl.constexpr,
    PDL: tl.constexpr = False, MIN_BLOCKS: tl.constexpr = 1, BIASED_V: tl.constexpr = False,
    k_ptr=None, v_ptr=None, pos_ptr=None, cs_ptr=None, slot_ptr=None, stride_q=0, stride_k=0, stride_v=0,
    APPEND: tl.constexpr = False, HADAMARD: tl.constexpr = False, FENCE: tl.constexpr = False,
    CHAINS: tl.constexpr = 2,
):
    """`_decode_kernel_t` as CHAINS independent chains in one program, a warp each (the launch's
    num_warps is the plan's times CHAINS): chain c takes the split's blocks c, c + CHAINS, ... (counted
    from the split's first) with its own softmax state, the
    leading dimension of every tensor, so each warp's reductions stay in the warp; the chains merge
    by their log-sum-exps once, at the end, through shared memory. Against CHAINS splits it keeps
    the warps per scheduler (the latency of one chain's dependent instructions hidden behind the
    others') without the split merge's partial stores, fence, counter and L2 round trips.
    Blocks are whole pages or fractions of one (BLOCK_T <= PAGE)."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    D: tl.constexpr = 2 * HALF
    W: tl.constexpr = HALF if BITS == 4 else D
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, HALF)
    c = tl.arange(0, CHAINS)
    t = tl.arange(0, BLOCK_T)
    g_mask = g < GROUP
    head = h * GROUP + g

    HI16: tl.constexpr = BITS == 4 and (FAST or BIASED)
    q_off, q_lo, q_hi, q_sum, k_bias = _load_q(q_ptr, b, HQ, head, g_mask, j, D, HALF, HI16, True, stride_q,
                                               pos_ptr, cs_ptr, APPEND, HADAMARD)  # q^T
    q_lo = tl.broadcast_to(q_lo[None, :, :], (CHAINS, HALF, BLOCK_G))
    q_hi = tl.broadcast_to(q_hi[None, :, :], (CHAINS, HALF, BLOCK_G))

    ctx, blk_begin, blk_end, used = _split_blocks(len_ptr, b, split, num_splits, BLOCK_T, MIN_BLOCKS)
    if APPEND:
        _append(k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, ctx,
                blk_begin, blk_end, HKV, stride_k, stride_v, PAGE, BLOCK_T, HALF, BITS, HADAMARD, FENCE)
    steps = tl.cdiv(blk_end - blk_begin, CHAINS)

    m_i = tl.full((CHAINS, BLOCK_G), -float("inf"), tl.float32)
    l_i = tl.zeros((CHAINS, BLOCK_G), tl.float32)
    acc_lo = tl.zeros((CHAINS, HALF, BLOCK_G), tl.float32)
    acc_hi = tl.zeros((CHAINS, HALF, BLOCK_G), tl.float32)
    z_acc = tl.zeros((CHAINS, BLOCK_G), tl.float32)
    for step in tl.range(0, steps, num_stages=NUM_STAGES):
        blk = blk_begin + step * CHAINS + c  # [CHAINS]: past blk_end in the last step, read as its last block
        row, v_tok = _block_rows(bt_ptr, b, bt_stride, tl.minimum(blk, blk_end - 1)[:, None], h, ctx, HKV, PAGE,
                                 BLOCK_T, W)  # [CHAINS, BLOCK_T]
        kb = tl.load(kc_ptr + row[:, :, None] * W + j[None, None, :])
        vt_off = v_tok[:, None, :] + j[None, :, None] * PAGE  # V^T [CHAINS, HALF, BLOCK_T]
        if BITS == 4:
            k_lo, k_hi = _kv4_codes(kb, FAST, BIASED, HI16)
            v_lo, v_hi = _kv4_codes(tl.load(vc_ptr + vt_off), FAST, BIASED_V, HI16)
        else:
            k_lo, k_hi = _kv8_codes(kb, tl.load(kc_ptr + row[:, :, None] * W + HALF + j[None, None, :]), FAST, BIASED)
            v_lo, v_hi = _kv8_codes(tl.load(vc_ptr + vt_off), tl.load(vc_ptr + vt_off + HALF * PAGE), FAST, BIASED_V)
        s = tl.dot(k_lo, q_lo)
        s = tl.dot(k_hi, q_hi, s)  # S^T [CHAINS, BLOCK_T, BLOCK_G]
        k_scale = tl.load(ks_ptr + row).to(tl.float32)[:, :, None] * sm_scale_log2
        k_zero = tl.load(kz_ptr + row).to(tl.float32)[:, :, None] * sm_scale_log2
        if BIASED:
            s = (s - k_bias[None, None, :]) * k_scale + k_zero * q_sum[None, None, :]
        else:
            s = s * k_scale + k_zero * q_sum[None, None, :]
        if step == steps - 1:  # the last step: chains past the split's end, tokens past the context
            live = (blk < blk_end)[:, None] & (blk[:, None] * BLOCK_T + t[None, :] < ctx)
            s = tl.where(live[:, :, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new > -float("inf"), m_new, 0.0)  # a chain that has seen no token yet
        alpha = tl.exp2(m_i - m_use)
        prob = tl.exp2(s - m_use[:, None, :])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        v_scale = tl.load(vs_ptr + row).to(tl.float32)[:, :, None]
        v_zero = tl.load(vz_ptr + row).to(tl.float32)[:, :, None]
        p16 = (prob * v_scale).to(tl.float16)
        z_acc = z_acc * alpha + tl.sum(prob * v_zero, axis=1)
        if BIASED_V:
            bias = (-1024.0 * tl.sum(p16.to(tl.float32), axis=1))[:, None, :]
            acc_lo = tl.dot(v_lo, p16, tl.fma(acc_lo, alpha[:, None, :], bias))  # O^T [CHAINS, HALF, BLOCK_G]
            acc_hi = tl.dot(v_hi, p16, tl.fma(acc_hi, alpha[:, None, :], bias))
        else:
            acc_lo = tl.dot(v_lo, p16, acc_lo * alpha[:, None, :])
            acc_hi = tl.dot(v_hi, p16, acc_hi * alpha[:, None, :])
        m_i = m_new

    # the chains' merge: the across-warp reductions of the whole launch, once
    m_all = tl.max(m_i, axis=0)
    m_safe = tl.where(m_all > -float("inf"), m_all, 0.0)
    w = tl.exp2(m_i - m_safe[None, :])  # [CHAINS, BLOCK_G]; 0 for a chain without tokens
    l_i = tl.sum(l_i * w, axis=0)
    z_sum = tl.sum(z_acc * w, axis=0)
    acc_lo = tl.sum(acc_lo * w[:, None, :], axis=0)
    acc_hi = tl.sum(acc_hi * w[:, None, :], axis=0)
    m_i = m_all
    _store_t(o_ptr, part_ptr, lse_ptr, cnt_ptr, acc_lo, acc_hi, z_sum, m_i, l_i, q_off, b, h, split, head, g_mask, j,
             num_splits, used, HQ, HKV, D, HALF, BLOCK_G, BLOCK_S, HI16, SPLIT)


MAX_SPLITS = 32  # the merge reads the log-sum-exps of up to this many splits at once


@dataclass(frozen=True)
class DecodePlan:
    """How decode attention runs for one KV bit width: read from the GPU's table
    (qoq/kernels/configs/<device>.json, "decode_attention", keyed by bits; "decode_attention_latency"
    for launches of fewer (sequence, kv head) pairs than SMs, "decode_attention_wide" for launches
    of at least WIDE_PER_SM per SM, `decode_plan`) or DEFAULT_PLANS.

    Split-K (`decode_splits`): as many splits per (sequence, kv head) as make one full wave of
    resident programs (programs_per_sm x SMs, a program of several chains counting as that
    many), and where the programs make more than one wave but fewer than max_waves, enough to
    make max_waves: a last, partial wave of a few left SMs idle; and in the kernel never fewer
    than min_split_blocks blocks of tokens per chain of a split (a short context at a small
    batch: fewer partials to merge, no idle chains). Without splits and at least
    deep_min_programs programs, deep_stages pipeline stages (0: keep num_stages)."""

    transposed: bool = False  # `_decode_kernel_t`: tokens as the MMA's M, the GQA group its N
    num_warps: int = 1
    num_stages: int = 2
    biased: bool = False  # K codes kept as 1024 + code, the bias taken off each score row
    biased_v: bool = False  # V codes kept as 1024 + code too, the bias taken off each page's output
    skew: bool = False  # transposed kernel: the next block's scores computed alongside this one's softmax
    chains: int = 1  # transposed kernel, KV4 / KV8: at most this many chains per program (`_decode_kernel_c`,
    #                  num_warps each; `decode_chains`: halved while the launch's chains overfill a wave)
    block_t: int = 0  # tokens per iteration; 0 = one page (at least 16)
    programs_per_sm: int = 8
    max_waves: int = 3
    min_split_blocks: int = 1
    deep_stages: int = 0
    deep_min_programs: int = 4096
    fast: bool | None = None  # PTX code unpack (default: on CUDA); tests and probes only
    maxnreg: int = 0  # register cap per thread (0: none): more resident programs (168: 12 warps per SM)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default and f.name != "fast"}

    def with_options(self, options: dict | None) -> DecodePlan:
        """The plan with a probe's or test's option dict applied (keys num_warps, NUM_STAGES,
        BIASED, BIASED_V, SKEW, CHAINS, SWAP, BLOCK_T, FAST, maxnreg): a pinned NUM_STAGES also pins the
        deep stages, the residency follows num_warps (8 one-warp programs per SM, 2 of four), and
        options without CHAINS run one chain (they name one kernel variant)."""
        if not options:
            return self
        keys = dict(num_warps="num_warps", NUM_STAGES="num_stages", BIASED="biased", BIASED_V="biased_v",
                    SKEW="skew", CHAINS="chains", SWAP="transposed", BLOCK_T="block_t", FAST="fast", maxnreg="maxnreg")
        changes = {"chains": 1, **{keys[k]: v for k, v in options.items()}}
        if "num_stages" in changes:
            changes["deep_stages"] = 0
        if "num_warps" in changes:
            changes["programs_per_sm"] = 8 if changes["num_warps"] == 1 else 2
        return dataclasses.replace(self, **changes)


# The H100-tuned plans, also every GPU's without a table (none of it depends on the model):
# one warp per program (no cross-warp softmax reductions); the transposed kernel for KV4 (fewer
# registers), two chains a program where the launch leaves room (`decode_chains`); KV8 and fp16
# on the row kernel (benchmarks/results/attention-h100.json, atune-results-h100.json).
DEFAULT_PLANS = {4: DecodePlan(transposed=True, num_warps=1, num_stages=2, biased=True, chains=2, deep_stages=3),
                 8: DecodePlan(num_warps=1, num_stages=2, biased=True, deep_stages=3),
                 16: DecodePlan(num_warps=4, num_stages=2, programs_per_sm=2)}


LATENCY_KEY = "decode_attention_latency"  # the table's plans for launches of fewer (sequence, kv head) pairs than SMs
WIDE_KEY = "decode_attention_wide"  # its plans for launches of at least WIDE_PER_SM pairs per SM
WIDE_PER_SM = 8


def decode_plan(bits: int, device: torch.device, programs: int | None = None) -> DecodePlan:
    """The table's plan for `bits`; where the launch has fewer (sequence, kv head) pairs
    (`programs`) than the GPU has SMs (a batch of a few sequences: the step waits on one program's
    latency, not on the programs' throughput), its latency plan, tuned at such batches, and where it
    has at least WIDE_PER_SM per SM (a full wave of one-warp programs without splits: serving
    batches of a few hundred), its wide plan, if it has them."""
    table = configs.device_table(device) or {}
    entry = None
    if programs is not None and programs < num_sms(device):
        entry = table.get(LATENCY_KEY, {}).get(str(bits))
    elif programs is not None and programs >= WIDE_PER_SM * num_sms(device):
        entry = table.get(WIDE_KEY, {}).get(str(bits))
    if entry is None:
        entry = table.get("decode_attention", {}).get(str(bits))
    return DecodePlan(**entry) if entry is not None else DEFAULT_PLANS[bits]


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    """The GPU's SM count (8 for the CPU's interpreter runs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_chains(plan: DecodePlan, programs: int, device) -> int:
    """Chains per program for a launch of `programs` (sequence, kv head) pairs: the plan's, halved
    while the chains would make more than one wave of resident ones (programs_per_sm x SMs). Chains
    fill an underfull wave before splits do (no partials to merge), and where the pairs fill the
    wave alone, one chain a program keeps its fewer warps' worth of registers and shared memory
    (H100, KV4 at context 1,024: batch 64, 512 pairs, 32.4 us with 2 chains against 34.8 with one;
    batch 128, 1,024 pairs, 75.2 against 58.0: atune-results-h100.json)."""
    chains = plan.chains
    while chains > 1 and programs * chains > plan.programs_per_sm * num_sms(device):
        chains //= 2
    return chains


def decode_splits(plan: DecodePlan, batch: int, num_kv_heads: int, max_blocks: int, device) -> int:
    """Split-K programs per sequence (DecodePlan says the rule)."""
    resident = plan.programs_per_sm * num_sms(device) // plan.chains
    programs = batch * num_kv_heads
    splits = max(1, resident // programs)
    while resident < programs * splits < plan.max_waves * resident:
        splits += 1
    return min(splits, -(-max_blocks // (plan.min_split_blocks * plan.chains)), MAX_SPLITS)


def paged_decode_attention_triton(q, cache: KVCacheLayer, block_tables, context_lens, scale,
                                  num_splits=None, options=None, out=None, append: KVAppend | None = None,
                                  plan: DecodePlan | None = None):
    """plan: run this DecodePlan instead of the table's (the tuner's candidates). append
    (`KVAppend`): q comes unrotated and the step's new K / V are rotated and written by the launch
    (`_load_q`, `_append`), so no `rope_kv_write` runs before it."""
    _check(q, cache, block_tables, context_lens)
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    group = hq // hkv
    if d & (d - 1) or cache.page_size & (cache.page_size - 1):
        raise ValueError("the Triton decode needs power-of-two head_dim and page_size")
    if append is None:
        q, fused = q.contiguous(), {}
    else:  # q, k and v may stay views of the qkv output (rows of packed heads)
        check_rope(q, append.k, append.v, append.positions, append.cos_sin_cache, append.slot_mapping, cache)
        q, k, v = (token_rows(x) for x in (q, append.k, append.v))
        fused = dict(k_ptr=k, v_ptr=v, pos_ptr=append.positions, cs_ptr=append.cos_sin_cache.contiguous(),
                     slot_ptr=append.slot_mapping, stride_q=q.stride(0), stride_k=k.stride(0), stride_v=v.stride(0),
                     APPEND=True, HADAMARD=cache.qk_hadamard, FENCE=q.is_cuda)
    plan = (plan or decode_plan(cache.bits, q.device, b * hkv)).with_options(options)
    # BLOCK_T == page_size takes the fast one-page-per-iteration path
    block_t = plan.block_t or max(16, cache.page_size)
    if plan.chains > 1:
        if not plan.transposed or cache.bits == 16 or plan.skew or block_t > cache.page_size:
            raise ValueError(f"{plan}: chains run the transposed kernel on a KV4 / KV8 cache, without skew, "
                             "a page or less per block")
        chains = decode_chains(plan, b * hkv, q.device)
        if chains != plan.chains:  # no new plan object on the launch path where the ceiling stands
            plan = dataclasses.replace(plan, chains=chains)
    max_blocks = -(-block_tables.shape[1] * cache.page_size // block_t)
    splits = num_splits or decode_splits(plan, b, hkv, max_blocks, q.device)
    stages = plan.num_stages
    if plan.deep_stages and cache.bits != 16 and splits == 1 and b * hkv >= plan.deep_min_programs:
        stages = plan.deep_stages
    out = output_like(q, out)
    if splits == 1:
        part, lse, cnt = out, out, context_lens
    else:
        part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
        cnt = arrival_counters(q.device, b * hkv)
    meta = [cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero]
    meta = [m if m is not None else cache.k_cache for m in meta]
    swap = plan.transposed
    kernel = _decode_kernel_t if swap else _decode_kernel
    extra = {"SKEW": True} if swap and plan.skew else {}
    if plan.chains > 1:
        kernel, extra = _decode_kernel_c, {"CHAINS": plan.chains}
    kernel[(b, hkv, splits)](
        q, cache.k_cache, cache.v_cache, *meta, block_tables, context_lens, out, part, lse, cnt,
        hq, hkv, block_tables.stride(0), float(scale) * math.log2(math.e), splits,
        GROUP=group, BLOCK_G=max(8 if swap else 16, triton.next_power_of_2(group)), HALF=d // 2,
        PAGE=cache.page_size, BITS=cache.bits, SPLIT=splits > 1, NUM_STAGES=stages,
        BLOCK_T=block_t, FAST=q.is_cuda if plan.fast is None else plan.fast,
        BLOCK_S=max(MAX_SPLITS, triton.next_power_of_2(splits)), BIASED=plan.biased and cache.bits != 16,
        MIN_BLOCKS=plan.min_split_blocks * plan.chains, BIASED_V=plan.biased_v and cache.bits != 16, **extra,
        num_warps=plan.num_warps * plan.chains, **({"maxnreg": plan.maxnreg} if plan.maxnreg else {}), **pdl_launch(q),
        **fused,
    )
    return out


paged_decode_attention = dispatch(paged_decode_attention_ref, paged_decode_attention_triton)
