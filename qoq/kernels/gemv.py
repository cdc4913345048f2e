"""The "gemv" GEMM plan kernel: a few tokens' W4A8 / W8A8 GEMM on the CUDA cores.

At one to a few tokens a GEMM is a weight stream, and what costs is getting the weight bytes in
flight, not multiplying them. The tensor-core kernels (int_gemm.py) pad the tokens to an MMA's
narrow side and have to bring each unpacked weight tile into the MMA's fragment layout; this
kernel instead reads each weight row as 32-bit words, 16 bytes per thread and load, and multiplies
them with `dp4a` (four int8 products and their sum in one instruction) against the token's int8
codes, also read as words. One program computes BLOCK_N outputs of one token (the tokens are in
the grid, fastest, so the programs of one weight tile run together and the later tokens read it
from L2) over one K split; split-K merges in the same launch as int_gemm's register kernel does.

Packed W4 words (int_gemm.pack_w4): word i of a row's 128-channel chunk holds channels 4i..4i+3
in its low nibbles and 64+4i..64+4i+3 in its high nibbles, so `w & 0x0F0F0F0F` and
`(w >> 4) & 0x0F0F0F0F` are four unsigned codes each, matching the token's words i and 16 + i of
the chunk. Per-channel W4 dots the codes themselves (the zero is the epilogue's, as in int_gemm).
g128 uses subtraction after multiplication: sum_j (q4_j * s2 - sz) x_j = s2 * (q4 . x) - sz * sum_j x_j
per word pair, all in int32 (the same magnitudes as int_gemm's accumulator), so the group's step
and zero cost two integer multiply-adds per word instead of a per-weight unpack. Off CUDA (the
interpreter cannot run PTX) dp4a is computed byte by byte.
"""

from __future__ import annotations

import torch

from qoq.kernels.dispatch import arrival_counters, lazy_jit, pdl
from qoq.kernels.gemm_plan import GEMV_MAX_M, MODE_W4_G128, GemmPlan, device_caps
from qoq.kernels.quant import ActInput, act_block, act_codes, act_stats

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    _DP4A_SS = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")
    _DP4A_US = tl.constexpr("dp4a.u32.s32 $0, $1, $2, $3;")
    _BYTE_OF = tl.constexpr("prmt.b32 $0, $1, 0, $2;")


@lazy_jit.helper
def _byte_of(w, u, FAST: tl.constexpr):
    """Byte u (0-3, little-endian) of each int32 word of w, zero-extended: one byte permute on CUDA,
    else a shift and a mask."""
    if FAST:
        sel = tl.broadcast_to(0x4440 | u, w.shape)  # result byte 0 = w's byte u, bytes 1-3 = 0
        return tl.inline_asm_elementwise(_BYTE_OF, "=r,r,r", [w, sel], dtype=tl.int32, is_pure=True, pack=1)
    return (w >> (8 * u)) & 0xFF


@lazy_jit.helper
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, FAST: tl.constexpr):
    """c + the sum of the four byte products of the int32 words a and b (b's bytes signed, a's
    signed where SIGNED_A, else unsigned); a, b, c of one shape."""
    if FAST:
        asm: tl.constexpr = _DP4A_SS if SIGNED_A else _DP4A_US
        out = tl.inline_asm_elementwise(asm, "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = c
        for i in tl.static_range(4):
            if SIGNED_A:
                ab = (a << (24 - 8 * i)) >> 24
            else:
                ab = (a >> (8 * i)) & 0xFF
            out = out + ab * ((b << (24 - 8 * i)) >> 24)
    return out


@lazy_jit.helper
def prefetch_line_l2(ptrs):
    """Prefetch the cache line of each address of `ptrs` into L2 (one instruction per thread)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs.to(tl.int64, bitcast=False)],
                              dtype=tl.int32, is_pure=False, pack=1)


@lazy_jit.helper
def packed_group_words(s2_ptr, sz_ptr, s_off, n_mask, UNROLL: tl.constexpr):
    """The s2 and sz bytes of UNROLL (2 or 4) consecutive g128 chunks of each row, from byte
    offset s_off, as one 16- or 32-bit word per row each (int32; chunk u in byte u)."""
    word: tl.constexpr = tl.uint16 if UNROLL == 2 else tl.uint32
    s2w = tl.load((s2_ptr + s_off).to(tl.pointer_type(word), bitcast=True), mask=n_mask, other=0).to(tl.int32)
    szw = tl.load((sz_ptr + s_off).to(tl.pointer_type(word), bitcast=True), mask=n_mask, other=0).to(tl.int32)
    return s2w, szw


def params_packed(mode: int, unroll: int, s2, sz) -> bool:
    """Whether g128's s2 / sz bytes of a row's `unroll` chunks can be read as one word per loop
    iteration (packed_group_words: UNROLL 2 or 4, the scale rows and bases aligned to it). Byte
    loads are too narrow for the pipeline's asynchronous copies: each one in the loop is a
    synchronous round trip to memory every iteration (gemv g128 gate_up at M=1 on an H100: 24.8
    against 27.5 us). Unroll 1 keeps them: the word form's shifts cost the register kernels more
    than the latency they hide (the same H100, reg_a 64x64 at M=64: 13.8 against 12.0 us)."""
    return (mode == MODE_W4_G128 and unroll in (2, 4) and s2.stride(0) % unroll == 0
            and s2.data_ptr() % unroll == 0 and sz.stride(0) == s2.stride(0) and sz.data_ptr() % unroll == 0)


@lazy_jit.helper
def store_split(y_ptr, ws_ptr, cnt_ptr, y, offs_y, mask, tile, pid_k, mn, SPLIT_K: tl.constexpr):
    """Store a program's fp32 result `y` at offs_y: directly (fp16) without split-K; with it, as a
    partial in the workspace, and the last split to arrive at the tile's counter (acq_rel) sums the
    partials in split order, stores fp16 and resets the counter to 0 for the next call."""
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_y, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * mn + offs_y, y, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.load(ws_ptr + offs_y, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(ws_ptr + s * mn + offs_y, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@lazy_jit
def _gemv_kernel(
    x_ptr, w_ptr, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_sg,
    MODE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, UNROLL: tl.constexpr,
    NUM_STAGES: tl.constexpr, FAST: tl.constexpr, PDL: tl.constexpr = 0,
    xq_ptr=None, xf_ptr=None, r_ptr=None, nw_ptr=None, s_ptr=None, H=0, eps=0.0,
    ACT: tl.constexpr = 0, HAS_NW: tl.constexpr = False, ACT_BLOCK: tl.constexpr = 512,
    PACKED: tl.constexpr = False,
):
    """x_ptr: the int8 codes as int32 words [M, K / 4]; w_ptr: the weight rows as int32 words (W8
    [N, K / 4], packed W4 [N, K / 8]). UNROLL chunks of 128 channels per loop iteration (each
    split's chunk count a multiple of it). PDL (a dependent launch): the first PDL chunks' weight
    lines go to L2 before the wait for the previous kernel, as in int_gemm.

    ACT (quant.ActInput's kinds): the program quantizes its token's fp16 row itself, as int_gemm's
    ACT prologue does (the row's statistics in one pass, then the codes), but writes the codes of
    its own split's chunks into the int8 buffer xq_ptr (x_ptr's bytes) and reads them back as
    words after a barrier: every program of a split writes the same codes to the same bytes, so
    the writes agree, and the words stay a plain vector load. Per-channel W4 then takes each
    split's own share of the zero term. PACKED (params_packed): g128's group parameters of an
    iteration's chunks in one word per row."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = pid % M  # tokens fastest: the programs of one weight tile run together
    pid_n = pid // M
    WPC: tl.constexpr = 32 if MODE == 0 else 16  # weight words per row per chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    u = tl.arange(0, UNROLL)
    i = tl.arange(0, WPC)

    num_chunks = K // 128
    per_split = tl.cdiv(num_chunks, SPLIT_K)
    c_begin = pid_k * per_split
    c_end = tl.minimum(c_begin + per_split, num_chunks)

    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * (num_chunks * WPC)
    # [U, BN, WPC]: the rows between the chunks and the words, so that the layout spreads a warp's
    # threads over the words and chunks first and each thread holds the same word positions of
    # several rows (the x-side work of a position is then done once per thread, not once per row)
    w_base = w_rows[None, :, None] + (u[:, None] * WPC)[:, :, None] + i[None, None, :]
    x_base = x_ptr + m.to(tl.int64) * (K // 4) + (u[:, None] * 32 + i[None, :])[:, None, :]  # [U, 1, WPC]
    if PDL > 0:  # weights only (no kernel writes them), then wait for the previous kernel
        for j in tl.static_range(0, PDL * WPC, 32):  # one 128-byte line per row per 32 words
            if c_begin * WPC + j < c_end * WPC:
                prefetch_line_l2(w_rows + c_begin * WPC + j)
        gdc_wait()
        gdc_launch_dependents()
    if ACT > 0:  # after the wait: the row is the previous kernel's output
        # ACT_BLOCK channels a step, all the program's threads at once: the row's statistics,
        # then the codes of this split's channels (two passes of a few dependent loads each)
        offs_m = m + tl.zeros((1,), tl.int32)
        m_ok = offs_m < M
        scale, inv = act_stats(xf_ptr, r_ptr, nw_ptr, s_ptr, offs_m, m_ok, H, eps, (pid_n == 0) & (pid_k == 0),
                               ACT, HAS_NW, 1, ACT_BLOCK)
        safe = tl.where(scale > 0, scale, 1.0)
        offs_h = tl.arange(0, ACT_BLOCK)
        xf_base = offs_m[None, :].to(tl.int64) * H + offs_h[:, None]  # [ACT_BLOCK, 1]
        xq_row = xq_ptr + m.to(tl.int64) * K + offs_h[:, None]
        csum = tl.zeros((1,), tl.float32)
        for k0 in range(c_begin * 128, c_end * 128, ACT_BLOCK):
            in_split = (k0 + offs_h < c_end * 128)[:, None]
            q = act_codes(xf_ptr, r_ptr, nw_ptr, xf_base, k0, offs_h, m_ok[None, :] & in_split, H, inv, safe,
                          ACT, HAS_NW)
            tl.store(xq_row + k0, q, mask=in_split)
            if MODE == 2:
                csum += tl.sum(q.to(tl.float32), axis=0)
        tl.debug_barrier()  # the codes are the program's loads' input

    acc = tl.zeros((UNROLL, BLOCK_N, WPC), dtype=tl.int32)
    zero = tl.zeros((UNROLL, 1, WPC), dtype=tl.int32)
    ones = tl.full((UNROLL, 1, WPC), 0x01010101, tl.int32)
    for c0 in tl.range(c_begin, c_end, UNROLL, num_stages=NUM_STAGES):
        wv = tl.load(w_base + c0 * WPC, mask=n_mask[None, :, None], other=0)
        xa = tl.load(x_base + c0 * 32)
        if MODE == 0:
            acc = _dp4a(wv, tl.broadcast_to(xa, (UNROLL, BLOCK_N, WPC)), acc, True, FAST)
        else:
            xb = tl.load(x_base + c0 * 32 + 16)
            lo = wv & 0x0F0F0F0F
            hi = (wv >> 4) & 0x0F0F0F0F
            xa3 = tl.broadcast_to(xa, (UNROLL, BLOCK_N, WPC))
            xb3 = tl.broadcast_to(xb, (UNROLL, BLOCK_N, WPC))
            if MODE == 1:
                t = _dp4a(hi, xb3, _dp4a(lo, xa3, tl.zeros_like(acc), False, FAST), False, FAST)
                if PACKED:  # byte u of the words, little-endian
                    s_off = tl.broadcast_to((offs_n * stride_sg + c0)[None, :], (UNROLL, BLOCK_N))
                    s2w, szw = packed_group_words(s2_ptr, sz_ptr, s_off, n_mask[None, :], UNROLL)
                    s2 = _byte_of(s2w, u[:, None], FAST)
                    sz = _byte_of(szw, u[:, None], FAST)
                else:
                    g = c0 + u[:, None] + offs_n[None, :] * stride_sg  # [U, BN]: the chunks' groups
                    s2 = tl.load(s2_ptr + g, mask=n_mask[None, :], other=0).to(tl.int32)
                    sz = tl.load(sz_ptr + g, mask=n_mask[None, :], other=0).to(tl.int32)
                # the words' share of the group's x sum, for its zero
                xs = _dp4a(ones, xb, _dp4a(ones, xa, zero, True, FAST), True, FAST)
                acc += t * s2[:, :, None] - sz[:, :, None] * tl.broadcast_to(xs, (UNROLL, BLOCK_N, WPC))
            else:
                acc = _dp4a(hi, xb3, _dp4a(lo, xa3, acc, False, FAST), False, FAST)

    total = tl.sum(tl.sum(acc, axis=2), axis=0).to(tl.float32)
    s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if ACT > 0:
        sx = scale
    else:
        sx = tl.load(sx_ptr + m)
    y = total * s1 * sx
    if MODE == 2:  # per-channel zero: one split applies the row's, or (ACT) every split its own codes' share
        szero = tl.load(sz_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ACT > 0:
            y = y - szero * (csum * scale)
        else:
            y = y - szero * (tl.load(xsum_ptr + m) * (pid_k == 0).to(tl.float32))
    store_split(y_ptr, ws_ptr, cnt_ptr, y, m.to(tl.int64) * N + offs_n, n_mask, pid, pid_k, N.to(tl.int64) * M,
                SPLIT_K)


def gemv_alignment_ok(x8: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the codes and weights can be read as 32-bit words (4-byte-aligned bases)."""
    return x8.data_ptr() % 4 == 0 and w.data_ptr() % 4 == 0


def launch_gemv(x8, sx, xsum, w, s1, s2, sz, y, mode: int, plan: GemmPlan, fast: bool,
                act: ActInput | None = None, K: int = 0) -> None:
    """Run a "gemv" plan: y [M, N] (fp16) of the int8 codes x8 [M, K] and the weight rows w; with
    `act`, of its fp16 rows, quantized by the kernel (x8, sx, xsum None; K the weight's)."""
    if act is not None:
        M = act.x.shape[0]
        x8 = torch.empty((M, K), dtype=torch.int8, device=y.device)  # the codes, written by the kernel
        sx = s1  # unread
        acts = dict(xq_ptr=x8, xf_ptr=act.x, r_ptr=act.residual, nw_ptr=act.weight, s_ptr=act.s, H=act.x.shape[1],
                    eps=float(act.eps), ACT=act.kind, HAS_NW=act.weight is not None,
                    ACT_BLOCK=act_block(act.x.shape[1], plan.num_warps))
    else:
        acts = {}
    M, K = x8.shape
    N = w.shape[0]
    if M > GEMV_MAX_M:
        raise ValueError(f"a gemv plan takes at most {GEMV_MAX_M} tokens, got M={M}")
    split, unroll = plan.split_k, plan.unroll
    per = triton.cdiv(K // 128, split)
    if per % unroll or (K // 128) % per % unroll:
        raise ValueError(f"UNROLL={unroll} must divide each split's chunks ({K // 128} chunks in {split} splits)")
    tiles = triton.cdiv(N, plan.block_n) * M
    if split == 1:
        ws, cnt = y, y
    else:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=y.device)
        cnt = arrival_counters(y.device, tiles)
    hopper = y.is_cuda and device_caps(y.device.index or 0)[1]
    launch = dict(PDL=plan.pdl_chunks, launch_pdl=True) if hopper and pdl(y) else {}
    _gemv_kernel[(tiles, split)](
        x8.view(torch.int32), w.view(torch.int32), sx, xsum if xsum is not None else sx, s1,
        s2 if s2 is not None else s1, sz if sz is not None else s1, y, ws, cnt,
        M, N, K, (s2.stride(0) if s2 is not None else 0),
        MODE=mode, BLOCK_N=plan.block_n, SPLIT_K=split, UNROLL=unroll, NUM_STAGES=plan.num_stages,
        FAST=fast, PACKED=params_packed(mode, unroll, s2, sz), num_warps=plan.num_warps,
        **launch, **acts,
    )
