"""The shared Triton INT8 tensor-core GEMM behind w4a8_gemm.py and w8a8_gemm.py.

Packed W4 layout (`pack_w4`): K is cut into chunks of 128 input channels (one g128 group);
byte j (0..63) of a chunk holds channel j in its low nibble and channel 64 + j in its high
nibble. A tile of one chunk therefore unpacks with one mask and one shift into two 64-wide
K halves that are each contiguous in X, and each half feeds its own `tl.dot`: no shuffles.

The kernel computes the transposed product Y^T = W' @ X^T ("swap AB"): the dequantized weight
tile is produced in registers, and a register operand may only be the A side of Hopper's
wgmma, while X^T (K-major in memory) is the B side read from shared memory. It also lets a
decode-sized M be the narrow N side of the MMA (down to 16) instead of padding it to 64.

On Hopper, larger M runs `_int8_gemm_tma_kernel` instead: X and the packed weight arrive by
TMA, the weight is unpacked in registers and handed to the MMA as its shared-memory B operand, so
wgmma stays asynchronous across chunks (a register A operand forces a wait per chunk); or W4 is
unpacked to int8 by its own kernel first and the int8 GEMM runs with 128x256 tiles; or the
warp-specialized Gluon kernel (ws_gemm.py) runs. Which kernel and tiles a GEMM takes is a
`GemmPlan` (gemm_plan.py) read from the GPU's table; the launchers here execute it.

MODE 0: W8A8 (int8 weights). MODE 1: W4A8 g128, Q8' = q4 * s2 - sz. On CUDA (FAST) it is computed
four weights per 32-bit word in inline PTX: q4 * s2 + (128 - sz) = Q8' + 128 lies in 0..255 for
valid data, so a word-wide multiply-add never carries between bytes, and xor 0x80808080 makes the
four int8 Q8'. MODE 2: W4A8 per-channel, q4 goes straight into the dot (and / shift per word) and
the zero is applied in the epilogue with the per-token activation sums. Off CUDA (the interpreter
cannot run PTX) the same values are computed element-wise.
"""

from __future__ import annotations

import dataclasses

import torch

from qoq.kernels import gemm_plan as gemm_plan_mod
from qoq.kernels import ws_gemm
from qoq.kernels.dispatch import arrival_counters, lazy_jit, pdl
from qoq.kernels.gemv import (
    gemv_alignment_ok, launch_gemv, packed_group_words, params_packed, prefetch_line_l2, store_split,
)
from qoq.kernels.gemm_plan import (  # noqa: F401  (MODE_* re-exported)
    CPU_SMS,
    HOPPER_KERNELS,
    MODE_W4_G128,
    MODE_W4_PER_CHANNEL,
    MODE_W8,
    GemmPlan,
    device_caps,
    fallback_plan,
    select_plan,
)
from qoq.kernels.ptx import G128_UNPACK_ASM, PER_CHANNEL_UNPACK_ASM
from qoq.kernels.quant import ACT_ADD_RMSNORM, ActInput, act_block, act_codes, act_stats, silu_mul_triton

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    TensorDescriptor = None

if tl is not None:  # the kernels see module globals only as constexprs
    _G128_ASM = tl.constexpr(G128_UNPACK_ASM)
    _PER_CHANNEL_ASM = tl.constexpr(PER_CHANNEL_UNPACK_ASM)

PACK_BLOCK = 128  # input channels per packed chunk; also the only g128 group size we run


@lazy_jit.helper
def _group_params(s2_ptr, sz_ptr, offs_n, n_mask, stride_sg, c, MODE: tl.constexpr):
    """The g128 step s2 and scaled zero sz of chunk c for the weight rows offs_n (MODE 1 only)."""
    if MODE == 1:
        s2 = tl.load(s2_ptr + offs_n * stride_sg + c, mask=n_mask, other=0).to(tl.int32)
        sz = tl.load(sz_ptr + offs_n * stride_sg + c, mask=n_mask, other=0).to(tl.int32)
    else:
        s2 = tl.zeros_like(offs_n)
        sz = tl.zeros_like(offs_n)
    return s2, sz


@lazy_jit.helper
def _gate_row(rows, half, INTERLEAVE: tl.constexpr):
    """The [gate | up] weight row behind row `rows` of the interleaved order (gate j at 2j, up j
    at 2j + 1); the identity without INTERLEAVE."""
    if INTERLEAVE:
        rows = (rows % 2) * half + rows // 2
    return rows


@lazy_jit.helper
def _unpack_w4(p, s2, sz, MODE: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed bytes [BLOCK_N, 64] of one 128-channel chunk -> int8 (low half, high half).

    MODE 1 (g128): Q8' = q4 * s2 - sz. MODE 2 (per-channel): q4 itself.
    """
    if MODE == 1:
        if FAST:
            # 4 weights per 32-bit word, s2 and 128 - sz (in every byte) as per-row words (ptx.py)
            s2w = tl.broadcast_to(s2.to(tl.int32)[:, None], (BLOCK_N, 64))
            cbw = tl.broadcast_to(((128 - sz) * 0x01010101).to(tl.int32)[:, None], (BLOCK_N, 64))
            w_lo, w_hi = tl.inline_asm_elementwise(
                asm=_G128_ASM, constraints="=r,=r" + ",r" * 9, args=[p, s2w, cbw],
                dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            w_lo = ((p & 0xF).to(tl.int32) * s2[:, None] - sz[:, None]).to(tl.int8)
            w_hi = ((p >> 4).to(tl.int32) * s2[:, None] - sz[:, None]).to(tl.int8)
    else:
        if FAST:
            w_lo, w_hi = tl.inline_asm_elementwise(
                asm=_PER_CHANNEL_ASM, constraints="=r,=r,r", args=[p],
                dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            w_lo = (p & 0xF).to(tl.int8)
            w_hi = (p >> 4).to(tl.int8)
    return w_lo, w_hi


@lazy_jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_sg,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, SWAP: tl.constexpr, FAST: tl.constexpr,
    UNROLL: tl.constexpr = 1, PREFETCH: tl.constexpr = 0, PACKED: tl.constexpr = False,
    PDL: tl.constexpr = 0,
    xf_ptr=None, r_ptr=None, nw_ptr=None, s_ptr=None, H=0, eps=0.0,
    ACT: tl.constexpr = 0, HAS_NW: tl.constexpr = False, ACT_BLOCK: tl.constexpr = 512,
):
    """UNROLL chunks per loop iteration (each split's chunk count a multiple of it): UNROLL * 64
    contiguous weight bytes per row per pipeline stage.

    PREFETCH (Hopper): the weight rows run PREFETCH chunks ahead of the loads in L2 (line
    prefetches: the first PREFETCH chunks of the program's K range at its start, then one line
    per row every 128 bytes), so more weight bytes are in flight than the pipeline's shared-memory
    stages hold.

    PACKED (g128, UNROLL 2 or 4, scale rows aligned to it): the UNROLL chunks' s2 / sz bytes of a
    row come in one 16- or 32-bit load per iteration instead of one byte load per chunk.

    PDL (launched as a programmatic dependent launch, dispatch.pdl): the program first prefetches
    the lines of its first PDL weight chunks into L2, which overlaps the kernel before it (the row
    kernel quantizing X), then waits for that kernel's completion before anything else and lets
    the kernel after it launch (dispatch.pdl_enter).

    ACT (SWAP only): the program quantizes its own activation rows instead of reading x8 / sx /
    xsum, as the row kernels of quant.py would (ACT_PLAIN: per token; ACT_RMSNORM: of
    x * rsqrt(mean(x^2) + eps) * nw; ACT_ADD_RMSNORM: of the norm of s = x + r rounded to x's
    dtype, which the programs of the first weight tile and split store). A prologue pass over the
    H input channels of the rows takes the statistics (sum of squares and absolute maximum), and
    each chunk is quantized as the loop loads it; per-channel W4 (MODE 2) sums each split's
    own codes for its share of the zero term. Decode-sized M only (gemm_plan.quantizes_input):
    every program reads the whole rows."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    # m fastest: CTAs running together share one weight tile through L2.
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, 64)
    n_mask = offs_n < N
    m_mask = offs_m < M

    num_chunks = K // 128
    per_split = tl.cdiv(num_chunks, SPLIT_K)
    c_begin = pid_k * per_split
    c_end = tl.minimum(c_begin + per_split, num_chunks)

    if SWAP:  # X^T tile [64, BM]
        x_base = x_ptr + offs_m[None, :].to(tl.int64) * K + offs_h[:, None]
        x_mask = m_mask[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:  # X tile [BM, 64]
        x_base = x_ptr + offs_m[:, None].to(tl.int64) * K + offs_h[None, :]
        x_mask = m_mask[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    row_bytes: tl.constexpr = 128 if MODE == 0 else 64  # weight bytes per row per chunk
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * (num_chunks * row_bytes)
    w_base = w_rows[:, None] + offs_h[None, :]

    if PDL > 0:  # weights only (no kernel writes them), then wait for the previous kernel
        for j in tl.static_range(0, PDL * row_bytes, 128):
            if c_begin * row_bytes + j < c_end * row_bytes:
                prefetch_line_l2(w_rows + c_begin * row_bytes + j)
        gdc_wait()
        gdc_launch_dependents()  # the next row kernel may launch and wait for this one
    if ACT > 0:  # after the wait: the rows are the previous kernel's output
        scale, inv = act_stats(xf_ptr, r_ptr, nw_ptr, s_ptr, offs_m, m_mask, H, eps,
                               (pid_n == 0) & (pid_k == 0), ACT, HAS_NW, BLOCK_M, ACT_BLOCK)
        safe = tl.where(scale > 0, scale, 1.0)
        xf_base = offs_m[None, :].to(tl.int64) * H + offs_h[:, None]  # [64, BM] of the fp16 rows
        csum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PREFETCH > 0:  # the lines of the first PREFETCH chunks
        for j in tl.static_range(0, PREFETCH * row_bytes, 128):
            if c_begin * row_bytes + j < c_end * row_bytes:
                prefetch_line_l2(w_rows + c_begin * row_bytes + j)
    for c0 in tl.range(c_begin, c_end, UNROLL, num_stages=NUM_STAGES):
        if PACKED:
            s2w, szw = packed_group_words(s2_ptr, sz_ptr, offs_n * stride_sg + c0, n_mask, UNROLL)
        for u in tl.static_range(UNROLL):
            c = c0 + u
            if PREFETCH > 0:  # the 128-byte line that chunk c + PREFETCH starts
                if (c + PREFETCH < c_end) & ((c + PREFETCH) * row_bytes % 128 == 0):
                    prefetch_line_l2(w_rows + (c + PREFETCH) * row_bytes)
            if ACT > 0:
                x_lo = act_codes(xf_ptr, r_ptr, nw_ptr, xf_base, c * 128, offs_h, x_mask, H, inv, safe, ACT, HAS_NW)
                x_hi = act_codes(xf_ptr, r_ptr, nw_ptr, xf_base, c * 128 + 64, offs_h, x_mask, H, inv, safe, ACT,
                                 HAS_NW)
                if MODE == 2:
                    csum += tl.sum(x_lo.to(tl.float32), axis=0) + tl.sum(x_hi.to(tl.float32), axis=0)
            else:
                x_lo = tl.load(x_base + c * 128, mask=x_mask, other=0)
                x_hi = tl.load(x_base + c * 128 + 64, mask=x_mask, other=0)
            if MODE == 0:
                w_lo = tl.load(w_base + c * 128, mask=n_mask[:, None], other=0)
                w_hi = tl.load(w_base + c * 128 + 64, mask=n_mask[:, None], other=0)
            else:
                p = tl.load(w_base + c * 64, mask=n_mask[:, None], other=0)
                if PACKED:  # byte u of the words, little-endian
                    s2 = (s2w >> (8 * u)) & 0xFF
                    sz = (szw >> (8 * u)) & 0xFF
                else:
                    s2, sz = _group_params(s2_ptr, sz_ptr, offs_n, n_mask, stride_sg, c, MODE)
                w_lo, w_hi = _unpack_w4(p, s2, sz, MODE, FAST, BLOCK_N)
            if SWAP:
                acc = tl.dot(w_lo, x_lo, acc, out_dtype=tl.int32)
                acc = tl.dot(w_hi, x_hi, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
                acc = tl.dot(x_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)

    s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if ACT > 0:
        sx = scale
    else:
        sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    if MODE == 2:
        szero = tl.load(sz_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ACT > 0:  # every split its own codes' share of the zero term
            xsum = csum * scale
        else:
            xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0.0)
            szero = szero * (pid_k == 0).to(tl.float32)  # only one K split applies the zero term
    if SWAP:
        y = acc.to(tl.float32) * s1[:, None] * sx[None, :]
        if MODE == 2:
            y = y - szero[:, None] * xsum[None, :]
        offs_y = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
    else:
        y = acc.to(tl.float32) * sx[:, None] * s1[None, :]
        if MODE == 2:
            y = y - xsum[:, None] * szero[None, :]
        offs_y = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    store_split(y_ptr, ws_ptr, cnt_ptr, y, offs_y, mask, pid, pid_k, N.to(tl.int64) * M, SPLIT_K)


@lazy_jit
def _int8_gemm_tma_kernel(
    x_desc, w_desc, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_sg,
    num_dp, split,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    GROUP_M: tl.constexpr, FAST: tl.constexpr, ZERO: tl.constexpr, GATED: tl.constexpr, SK: tl.constexpr,
):
    """Y = X @ W'^T with both MMA operands in shared memory (the large-M kernel, Hopper).

    GATED (MODE 0 over weights `_unpack_w4_kernel` interleaved): the N weight rows are gate/up
    pairs and Y [M, N / 2] = silu(gate) * up, the MLP's activation, split off in the epilogue;
    the per-channel scales stay in [gate | up] order.

    ZERO applies the per-channel zero term (MODE 2, or MODE 0 over per-channel W4 unpacked
    ahead of time by `_unpack_w4_kernel`).

    X and the packed (or int8) weight tiles arrive by TMA (out-of-bounds rows read as zeros);
    W4 tiles are unpacked in registers and handed to the MMA as its shared-memory B operand, so
    wgmma runs asynchronously and overlaps the next chunk's unpacking, which the register-A
    order of `_int8_gemm_kernel` cannot. Tiles are visited in groups of GROUP_M token tiles per
    weight column so that CTAs running together share weight tiles through L2.

    SK (data-parallel + split-K tail): programs below num_dp each own a whole tile; the last
    tiles, which would make a last, mostly empty wave, are cut into `split` K ranges, one program
    each. Their int32 partial accumulators go to a workspace and the last piece of a tile to
    arrive (acq_rel counter) adds them up, exactly (integers), and runs the epilogue: the output
    is bit-identical to the unsplit kernel's.
    """
    pid = tl.program_id(0)
    num_chunks = K // 128
    tile = pid
    c_begin = 0
    c_end = num_chunks
    if SK:
        piece = tl.maximum(pid - num_dp, 0)
        per_piece = tl.cdiv(num_chunks, split)
        tile = tl.where(pid < num_dp, pid, num_dp + piece // split)
        c_begin = tl.where(pid < num_dp, 0, (piece % split) * per_piece)
        c_end = tl.where(pid < num_dp, num_chunks, tl.minimum(c_begin + per_piece, num_chunks))
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row_m = pid_m * BLOCK_M
    row_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for c in tl.range(c_begin, c_end, num_stages=NUM_STAGES):
        if MODE == 0:  # descriptors with 128-wide K blocks: one MMA per chunk
            acc = tl.dot(x_desc.load([row_m, c * 128]), w_desc.load([row_n, c * 128]).T, acc,
                         out_dtype=tl.int32)
        else:  # descriptors with 64-wide K blocks: the two nibble halves of the chunk
            x_lo = x_desc.load([row_m, c * 128])
            x_hi = x_desc.load([row_m, c * 128 + 64])
            p = w_desc.load([row_n, c * 64])
            s2, sz = _group_params(s2_ptr, sz_ptr, offs_n, n_mask, stride_sg, c, MODE)
            w_lo, w_hi = _unpack_w4(p, s2, sz, MODE, FAST, BLOCK_N)
            acc = tl.dot(x_lo, w_lo.T, acc, out_dtype=tl.int32)
            acc = tl.dot(x_hi, w_hi.T, acc, out_dtype=tl.int32)

    write = pid >= 0  # a split tile's pieces: only the last to arrive writes
    if SK:
        if pid >= num_dp:
            piece = pid - num_dp
            sk_tile = piece // split
            offs_ws = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tl.store(ws_ptr + piece.to(tl.int64) * (BLOCK_M * BLOCK_N) + offs_ws, acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + sk_tile, 1, sem="acq_rel", scope="gpu")
            write = arrived == split - 1
            if write:
                first = sk_tile.to(tl.int64) * split
                for s in range(0, split):
                    if first + s != piece:
                        acc += tl.load(ws_ptr + (first + s) * (BLOCK_M * BLOCK_N) + offs_ws, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + sk_tile, 0, sem="relaxed", scope="gpu")

    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    src = _gate_row(offs_n, N // 2, GATED)
    s1 = tl.load(s1_ptr + src, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * s1[None, :]
    if ZERO:
        xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0.0)
        szero = tl.load(sz_ptr + src, mask=n_mask, other=0.0).to(tl.float32)
        y = y - xsum[:, None] * szero[None, :]
    if GATED:
        gate, up = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
        y = gate / (1.0 + tl.exp(-gate)) * up
        offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * (N // 2) + offs_o[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(m_mask[:, None] & (offs_o < N // 2)[None, :]) & write)
    else:
        offs_y = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(y_ptr + offs_y, y.to(y_ptr.dtype.element_ty), mask=(m_mask[:, None] & n_mask[None, :]) & write)


@lazy_jit
def _unpack_w4_kernel(p_ptr, s2_ptr, sz_ptr, out_ptr, N, K, stride_sg,
                      MODE: tl.constexpr, BLOCK_N: tl.constexpr, FAST: tl.constexpr, INTERLEAVE: tl.constexpr):
    """Packed W4 [N, K/2] -> the int8 weights [N, K] the W4A8 kernels multiply by (q4 or Q8').

    INTERLEAVE: the rows are [gate | up] and come out interleaved (gate 0, up 0, gate 1, ...), so
    that every GEMM tile holds both halves of its output columns (`_gate_row`)."""
    c = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, 64)
    n_mask = offs_n < N
    src = _gate_row(offs_n, N // 2, INTERLEAVE)
    p = tl.load(p_ptr + src[:, None].to(tl.int64) * (K // 2) + c * 64 + offs_h[None, :],
                mask=n_mask[:, None], other=0)
    s2, sz = _group_params(s2_ptr, sz_ptr, src, n_mask, stride_sg, c, MODE)
    w_lo, w_hi = _unpack_w4(p, s2, sz, MODE, FAST, BLOCK_N)
    out = out_ptr + offs_n[:, None].to(tl.int64) * K + c * 128 + offs_h[None, :]
    tl.store(out, w_lo, mask=n_mask[:, None])
    tl.store(out + 64, w_hi, mask=n_mask[:, None])


def finish_ref(y: torch.Tensor, silu_mul: bool) -> torch.Tensor:
    """The references' epilogue: fp16 Y, or with silu_mul (W's rows [gate | up]) silu(gate) * up
    computed before rounding, as the gated kernel's epilogue does."""
    if silu_mul:
        gate, up = y.chunk(2, dim=1)
        y = torch.nn.functional.silu(gate) * up
    return y.to(torch.float16)


def gemm_plan(M: int, N: int, K: int, mode: int, device: torch.device) -> GemmPlan:
    """The plan a GEMM of this size runs on `device` (gemm_plan.select_plan: the device's table, or
    the fallback derived from the sizes)."""
    return select_plan(M, N, K, mode, device)


def fused_silu_mul(M: int, N: int, K: int, mode: int, device: torch.device) -> bool:
    """Whether a GEMM of [gate | up] weights applies silu(gate) * up in its own epilogue at this
    size: where its plan says so (W4 unpacked ahead on Hopper, the unpack interleaving the gate and
    up rows). Elsewhere `silu_mul=True` runs the GEMM and then a SiLU*mul pass."""
    if mode == MODE_W8 or device.type != "cuda" or triton is None:
        return False
    return select_plan(M, N, K, mode, device).fuse_silu_mul


def quantizes_input(M: int, N: int, K: int, mode: int, device: torch.device) -> bool:
    """Whether a GEMM of this size takes its activation as fp16 rows (`ActInput`) and quantizes it
    in its own prologue (int8_gemm_act_triton): decode-sized M on a GPU, where its plan says so."""
    if not gemm_plan_mod.act_prologue_allowed(M) or device.type != "cuda" or triton is None:
        return False
    return gemm_plan_mod.quantizes_input(select_plan(M, N, K, mode, device), M)


def _as_plan(config, M: int, N: int, K: int, mode: int, device: torch.device) -> GemmPlan:
    if config is None:
        return select_plan(M, N, K, mode, device)
    return config if isinstance(config, GemmPlan) else GemmPlan.from_config(config)


def int8_gemm_triton(x8, sx, xsum, w, s1, s2, sz, mode: int, config: GemmPlan | dict | None = None,
                     silu_mul: bool = False):
    """Launch the plan (`config`: a GemmPlan, a probe's tile dict, or None for the selected plan);
    inputs are validated by the callers.

    silu_mul: w's rows are [gate | up]; returns silu(gate) * up [M, N / 2] (in the epilogue where the
    plan fuses it, else after the GEMM)."""
    M, K = x8.shape
    N = w.shape[0]
    plan = _as_plan(config, M, N, K, mode, x8.device)
    if ((plan.kernel in HOPPER_KERNELS and (x8.data_ptr() % 16 or w.data_ptr() % 16))
            or (plan.kernel == "gemv" and not gemv_alignment_ok(x8, w))):
        # TMA needs 16-byte-aligned bases, gemv 4-byte ones: a property of these tensors, not of the shape
        sms = device_caps(x8.device.index or 0)[0] if x8.is_cuda else CPU_SMS
        plan = fallback_plan(M, N, K, mode, sms, tma=False, gluon=False)
    fast = x8.is_cuda if plan.fast is None else plan.fast
    if silu_mul:
        if plan.fuse_silu_mul and mode != MODE_W8:
            y = torch.empty((M, N // 2), dtype=torch.float16, device=x8.device)
            _launch_hopper(x8, sx, xsum, w, s1, s2, sz, y, mode, plan, fast, gated=True)
            return y
        return silu_mul_triton(int8_gemm_triton(x8, sx, xsum, w, s1, s2, sz, mode, plan))
    y = torch.empty((M, N), dtype=torch.float16, device=x8.device)
    if plan.kernel in HOPPER_KERNELS:
        _launch_hopper(x8, sx, xsum, w, s1, s2, sz, y, mode, plan, fast)
    elif plan.kernel == "gemv":
        launch_gemv(x8, sx, xsum, w, s1, s2, sz, y, mode, plan, fast)
    else:
        _launch_register(x8, sx, xsum, w, s1, s2, sz, y, mode, plan, fast)
    return y


def int8_gemm_act_triton(act: ActInput, w, s1, s2, sz, mode: int, config: GemmPlan | dict | None = None):
    """The GEMM of `act` quantized by the register kernel itself (ACT prologue): what
    int8_gemm_triton(*act_quantize(act), ...) computes, without the row kernel's pass (and for
    ACT_ADD_RMSNORM the residual sum written to act.s as that kernel writes it)."""
    M, H = act.x.shape
    N = w.shape[0]
    K = w.shape[1] * (1 if mode == MODE_W8 else 2)
    plan = _as_plan(config, M, N, K, mode, act.x.device)
    if plan.kernel == "gemv" and w.data_ptr() % 4:  # (words) the register kernel quantizes as well
        plan = fallback_plan(M, N, K, mode, device_caps(w.device.index or 0)[0] if w.is_cuda else CPU_SMS,
                             tma=False, gluon=False)
    if not gemm_plan_mod.quantizing_kernel(plan):
        raise ValueError(f"only the register kernels (swap_ab) and gemv quantize their input, not {plan}")
    if H > K or (act.kind == ACT_ADD_RMSNORM and act.s is None):
        raise ValueError(f"activation width {H} > K {K}, or no residual-sum output for ACT_ADD_RMSNORM")
    y = torch.empty((M, N), dtype=torch.float16, device=act.x.device)
    fast = act.x.is_cuda if plan.fast is None else plan.fast
    if plan.kernel == "gemv":
        launch_gemv(None, None, None, w, s1, s2, sz, y, mode, plan, fast, act=act, K=K)
    else:
        _launch_register(None, None, None, w, s1, s2, sz, y, mode, plan, fast, act=act, K=K)
    return y


def _launch_register(x8, sx, xsum, w, s1, s2, sz, y, mode: int, plan: GemmPlan, fast: bool,
                     act: ActInput | None = None, K: int = 0) -> None:
    """The register-A kernel (or its mma.sync form, fewer than four warps) with one-launch split-K;
    with `act`, quantizing its input rows itself (x8, sx, xsum None; K the weight's)."""
    M, K = (act.x.shape[0], K) if act is not None else x8.shape
    N = w.shape[0]
    split, unroll = plan.split_k, plan.unroll
    per = triton.cdiv(K // 128, split)
    if per % unroll or (K // 128) % per % unroll:
        raise ValueError(f"UNROLL={unroll} must divide each split's chunks ({K // 128} chunks in {split} splits)")
    tiles = triton.cdiv(M, plan.block_m) * triton.cdiv(N, plan.block_n)
    if split == 1:
        ws, cnt = y, y
    else:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=y.device)
        cnt = arrival_counters(y.device, tiles)
    dummy = sx if sx is not None else s1  # any tensor, for the pointers this mode does not read
    if act is not None:
        x8 = sx = dummy
        acts = dict(xf_ptr=act.x, r_ptr=act.residual, nw_ptr=act.weight, s_ptr=act.s, H=act.x.shape[1],
                    eps=float(act.eps), ACT=act.kind, HAS_NW=act.weight is not None,
                    ACT_BLOCK=act_block(act.x.shape[1], plan.num_warps))
    else:
        acts = {}
    packed = params_packed(mode, unroll, s2, sz)
    # the L2 prefetch is Hopper PTX: the interpreter and older GPUs run without it
    hopper = y.is_cuda and device_caps(y.device.index or 0)[1]
    # programmatic dependent launch: the plan's first weight chunks go to L2 before the wait
    launch = dict(PDL=plan.pdl_chunks, launch_pdl=True) if hopper and pdl(y) else {}
    _int8_gemm_kernel[(tiles, split)](
        x8, w, sx, xsum if xsum is not None else dummy, s1,
        s2 if s2 is not None else dummy, sz if sz is not None else dummy, y, ws, cnt,
        M, N, K, (s2.stride(0) if s2 is not None else 0),
        MODE=mode, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, SPLIT_K=split,
        NUM_STAGES=plan.num_stages, SWAP=plan.swap_ab, UNROLL=unroll, PACKED=packed,
        # the word-wide unpack and the prefetches are inline PTX, which the CPU interpreter cannot run
        FAST=fast, num_warps=plan.num_warps, **(dict(PREFETCH=plan.prefetch) if hopper else {}), **launch, **acts,
    )


def unpack_w4_int8(packed, s2, sz, mode: int, fast: bool | None = None, interleave: bool = False) -> torch.Tensor:
    """The int8 weights [N, K] of packed W4 (per-channel q4, or g128 Q8'), on the GPU.

    interleave: rows [gate | up] come out as gate/up pairs (gate j at 2j, up j at 2j + 1)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((N, K), dtype=torch.int8, device=packed.device)
    dummy = packed
    _unpack_w4_kernel[(triton.cdiv(N, 64), K // 128)](
        packed, s2 if s2 is not None else dummy, sz if sz is not None else dummy, out, N, K,
        (s2.stride(0) if s2 is not None else 0), MODE=mode, BLOCK_N=64,
        FAST=packed.is_cuda if fast is None else fast, INTERLEAVE=interleave)
    return out


def _launch_hopper(x8, sx, xsum, w, s1, s2, sz, y, mode: int, plan: GemmPlan, fast: bool, gated: bool = False) -> None:
    """The TMA kernel or the Gluon kernel. W4 is unpacked ahead where the plan says so, and for a
    gated (SiLU*mul) GEMM, whose unpack interleaves the gate and up rows for the epilogue."""
    M, K = x8.shape
    N = w.shape[0]
    zero = mode == MODE_W4_PER_CHANNEL
    if plan.kernel == "ws" and mode != MODE_W8 and not gated and plan.unpack == "in_loop":
        ws_gemm.ws_gemm(x8, w, sx, xsum, s1, s2, sz, y, mode, plan, zero=zero)
        return
    if mode != MODE_W8 and (plan.unpack == "ahead" or gated):
        # Unpack the layer's W4 to int8 once (a memory-bound pass costing ~5% of the GEMM at
        # M=8192) and run the int8 kernel, whose 128x256 tiles the in-loop unpack's registers do
        # not allow. The integers multiplied are the same, so is the result.
        w = unpack_w4_int8(w, s2, sz, mode, fast, interleave=gated)
        mode = MODE_W8
        plan = dataclasses.replace(plan, w_in_registers=False)  # packed W4 only
    if plan.kernel == "ws":
        ws_gemm.ws_gemm(x8, w, sx, xsum, s1, None, sz, y, MODE_W8, plan, zero=zero, gated=gated)
        return
    bm, bn = plan.block_m, plan.block_n
    bk = 128 if mode == MODE_W8 else 64  # W4: 64 packed bytes = one 128-channel chunk
    x_desc = TensorDescriptor.from_tensor(x8, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    consts = dict(MODE=mode, BLOCK_M=bm, BLOCK_N=bn, NUM_STAGES=plan.num_stages, GROUP_M=plan.group_m,
                  FAST=fast, ZERO=zero, GATED=gated, num_warps=plan.num_warps)
    key = (x8.device, *consts.values())  # consts is built in one fixed order
    slots = plan.slots or _TMA_SLOTS.get(key)
    num_dp, split = split_tail(tiles, slots, K // 128) if slots else (tiles, 1)
    if split > 1:
        ws = torch.empty((tiles - num_dp) * split * bm * bn, dtype=torch.int32, device=x8.device)
        cnt = arrival_counters(x8.device, tiles - num_dp)
    else:
        ws = cnt = y
    dummy = sx
    kernel = _int8_gemm_tma_kernel[(num_dp + (tiles - num_dp) * split,)](
        x_desc, w_desc, sx, xsum if xsum is not None else dummy, s1,
        s2 if s2 is not None else dummy, sz if sz is not None else dummy, y, ws, cnt,
        M, N, K, (s2.stride(0) if s2 is not None else 0), num_dp, split, SK=split > 1, **consts,
    )
    if key not in _TMA_SLOTS and x8.is_cuda and kernel is not None:
        _TMA_SLOTS[key] = resident_slots(kernel, plan.num_warps, x8.device)


# Resident CTAs of the TMA kernel on the whole GPU, per (device, compile-time constants): learned
# from the first launch's compiled kernel (registers, shared memory), used from the second on.
# Splitting changes only which programs add which exact int32 partials, so the first (unsplit)
# call and the later ones give identical results.
_TMA_SLOTS: dict = {}


def resident_slots(kernel, num_warps: int, device) -> int:
    """How many CTAs of a compiled Triton kernel an entire GPU holds at once (64K registers per SM
    on every NVIDIA GPU since Volta; shared memory and SM count from the device)."""
    props = torch.cuda.get_device_properties(device)
    threads = 32 * num_warps
    by_regs = 65536 // max(1, kernel.n_regs * threads)
    by_smem = props.shared_memory_per_multiprocessor // max(1, kernel.metadata.shared + 1024)
    by_threads = props.max_threads_per_multi_processor // threads
    return props.multi_processor_count * max(1, min(by_regs, by_smem, by_threads))


def split_tail(tiles: int, slots: int, chunks: int, min_chunks: int = 24) -> tuple[int, int]:
    """(whole-tile programs, K pieces per tail tile) for `tiles` output tiles on `slots` resident
    CTAs: the tiles that would form a last wave at most half full are cut into as many K pieces
    as fill it, so that the last wave is not one tile's full time with most SMs idle (e.g. 320
    tiles on 264 slots: 264 whole tiles, then 56 tiles in 4 pieces each). (tiles, 1) where
    splitting does not pay, and below one full wave (decode-sized M, whose tiles and split-K the
    plan chooses).

    Every piece keeps at least `min_chunks` 128-deep chunks: on the H100 the split paid on long K
    and short pieces were slower than whole tiles (benchmarks/results/split-tail-probe-h100.json)."""
    tail = tiles % slots
    if tiles < slots or tail == 0 or 2 * tail > slots:
        return tiles, 1
    split = min(slots // tail, chunks // min_chunks)
    return (tiles - tail, split) if split > 1 else (tiles, 1)
