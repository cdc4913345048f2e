"""The shared Triton INT8 tensor-core GEMM behind w4a8_gemm.py and w8a8_gemm.py.

Packed W4 layout (`pack_w4`): K is cut into chunks of 128 input channels (one g128 group);
byte j (0..63) of a chunk holds channel j in its low nibble and channel 64 + j in its high
nibble. A tile of one chunk therefore unpacks with one mask and one shift into two 64-wide
K halves that are each contiguous in X, and each half feeds its own `tl.dot`: no shuffles.

The kernel computes the transposed product Y^T = W' @ X^T ("swap AB"): the dequantized weight
tile is produced in registers, and a register operand may only be the A side of Hopper's
wgmma, while X^T (K-major in memory) is the B side read from shared memory. It also lets a
decode-sized M be the narrow N side of the MMA (down to 16) instead of padding it to 64.

MODE 0: W8A8 (int8 weights). MODE 1: W4A8 g128, Q8' = q4 * s2 - sz. On CUDA (FAST) it is computed
four weights per 32-bit word in inline PTX: q4 * s2 + (128 - sz) = Q8' + 128 lies in 0..255 for
valid data, so a word-wide multiply-add never carries between bytes, and xor 0x80808080 makes the
four int8 Q8'. MODE 2: W4A8 per-channel, q4 goes straight into the dot (and / shift per word) and
the zero is applied in the epilogue with the per-token activation sums. Off CUDA (the interpreter
cannot run PTX) the same values are computed element-wise.
"""

from __future__ import annotations

import torch

from qoq.kernels.dispatch import lazy_jit

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

PACK_BLOCK = 128  # input channels per packed chunk; also the only g128 group size we run
MODE_W8, MODE_W4_G128, MODE_W4_PER_CHANNEL = 0, 1, 2


@lazy_jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_sg,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, SWAP: tl.constexpr, FAST: tl.constexpr,
):
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
    if MODE == 0:
        w_base = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_h[None, :]
    else:
        w_base = w_ptr + offs_n[:, None].to(tl.int64) * (K // 2) + offs_h[None, :]

    for c in tl.range(c_begin, c_end, num_stages=NUM_STAGES):
        x_lo = tl.load(x_base + c * 128, mask=x_mask, other=0)
        x_hi = tl.load(x_base + c * 128 + 64, mask=x_mask, other=0)
        if MODE == 0:
            w_lo = tl.load(w_base + c * 128, mask=n_mask[:, None], other=0)
            w_hi = tl.load(w_base + c * 128 + 64, mask=n_mask[:, None], other=0)
        else:
            p = tl.load(w_base + c * 64, mask=n_mask[:, None], other=0)
            if MODE == 1:
                s2 = tl.load(s2_ptr + offs_n * stride_sg + c, mask=n_mask, other=0).to(tl.int32)
                sz = tl.load(sz_ptr + offs_n * stride_sg + c, mask=n_mask, other=0).to(tl.int32)
                if FAST:
                    # 4 weights per 32-bit word: q4 * s2 + (128 - sz) = Q8' + 128 lies in
                    # 0..255 for valid data, so a word-wide multiply-add never carries
                    # between bytes; xor 0x80 per byte turns Q8' + 128 into int8 Q8'.
                    s2b = tl.broadcast_to(s2.to(tl.uint8)[:, None], (BLOCK_N, 64))
                    cb = tl.broadcast_to((128 - sz).to(tl.uint8)[:, None], (BLOCK_N, 64))
                    w_lo, w_hi = tl.inline_asm_elementwise(
                        asm="""{
                        .reg .b32 t, s;
                        and.b32 s, $3, 0xFF;
                        and.b32 t, $2, 0x0F0F0F0F;
                        mad.lo.u32 t, t, s, $4;
                        xor.b32 $0, t, 0x80808080;
                        shr.u32 t, $2, 4;
                        and.b32 t, t, 0x0F0F0F0F;
                        mad.lo.u32 t, t, s, $4;
                        xor.b32 $1, t, 0x80808080;
                        }""",
                        constraints="=r,=r,r,r,r", args=[p, s2b, cb],
                        dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
                else:
                    w_lo = ((p & 0xF).to(tl.int32) * s2[:, None] - sz[:, None]).to(tl.int8)
                    w_hi = ((p >> 4).to(tl.int32) * s2[:, None] - sz[:, None]).to(tl.int8)
            else:
                if FAST:
                    w_lo, w_hi = tl.inline_asm_elementwise(
                        asm="""{
                        .reg .b32 t;
                        and.b32 $0, $2, 0x0F0F0F0F;
                        shr.u32 t, $2, 4;
                        and.b32 $1, t, 0x0F0F0F0F;
                        }""",
                        constraints="=r,=r,r", args=[p],
                        dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
                else:
                    w_lo = (p & 0xF).to(tl.int8)
                    w_hi = (p >> 4).to(tl.int8)
        if SWAP:
            acc = tl.dot(w_lo, x_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(w_hi, x_hi, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(x_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(x_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)

    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if MODE == 2:
        xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0.0)
        szero = tl.load(sz_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
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
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_y, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Split-K in one launch: every split writes its fp32 partial tile to the workspace; the
        # last split to arrive at the tile's counter (acq_rel) sums the partials, stores fp16
        # and resets the counter to 0 for the next call.
        mn = N.to(tl.int64) * M
        tl.store(ws_ptr + pid_k * mn + offs_y, y, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.load(ws_ptr + offs_y, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(ws_ptr + s * mn + offs_y, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")


def default_config(M: int, N: int, K: int, mode: int) -> dict:
    """Tiles by M bucket, from the H100 sweeps (docs/kernels.md, "Tuning log").

    The weight-as-A order (SWAP) won at every size. Small M is weight-bandwidth bound: narrow
    64-row weight tiles and a one-launch split-K until ~512 CTAs stream weights (256 for W8A8,
    whose CTAs move twice the bytes). At M=256 the main loop is latency-bound (the register-A
    wgmma is waited on every chunk), so the best tile is the one that keeps the most CTAs per SM
    busy for the shape: small tiles for N<=6144, 256-token tiles for the wide gate/up GEMM,
    split-K 2 for the K=14336 down projection.
    """
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
        want = 256 if mode == MODE_W8 else 512
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
        want = 128
    elif M <= 256:
        want = 0
        if mode == MODE_W8:
            big = N >= 16384 and M > 128
            cfg = dict(BLOCK_M=256 if big else (128 if N == 6144 and M > 128 else 64), BLOCK_N=128,
                       num_warps=8, num_stages=3 if big else 4)
        elif N >= 16384 and M > 128:
            cfg = (dict(BLOCK_M=256, BLOCK_N=64, num_warps=4, num_stages=3) if mode == MODE_W4_G128
                   else dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3))
        elif K >= 8192:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4)
            want = 2 * triton.cdiv(M, 128) * triton.cdiv(N, 64)  # split-K 2
        elif mode == MODE_W4_PER_CHANNEL and N <= 4096:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=6)
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
    elif M <= 768:
        # 256-token tiles would leave half of the SMs idle on N=4096 (64 CTAs at M=512): 128-token
        # tiles, split-K 2 for the K=14336 down projection (M=512 sweep, docs/kernels.md).
        want = 0
        if K >= 8192:
            cfg = dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3)
            want = 2 * triton.cdiv(M, 256) * triton.cdiv(N, 128)
        elif mode == MODE_W4_G128:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3)
        want = 0
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = 1
    while tiles * split < want and split < 8 and (K // 128) // (split * 2) >= 4:
        split *= 2
    cfg["SPLIT_K"] = split
    cfg["SWAP"] = True
    return cfg


_COUNTERS: dict = {}


def _tile_counters(device, tiles: int) -> torch.Tensor:
    """Zeroed int32 per-tile arrival counters for the one-launch split-K (kept per device).

    The kernel resets every counter it uses, so the buffer stays zero between calls. It is
    allocated outside CUDA-graph capture when possible (a buffer first made during a capture
    would live in that graph's private pool); inside a capture without a cached buffer, a fresh
    zeroed one is captured instead.
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        fresh = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        _COUNTERS[device] = buf = fresh
    return buf


def int8_gemm_triton(x8, sx, xsum, w, s1, s2, sz, mode: int, config: dict | None = None):
    """Launch the shared kernel; inputs are validated by the callers."""
    M, K = x8.shape
    N = w.shape[0]
    cfg = dict(config or default_config(M, N, K, mode))
    split = cfg.pop("SPLIT_K", 1)
    y = torch.empty((M, N), dtype=torch.float16, device=x8.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if split == 1:
        ws, cnt = y, y
    else:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x8.device)
        cnt = _tile_counters(x8.device, tiles)
    dummy = sx
    _int8_gemm_kernel[(tiles, split)](
        x8, w, sx, xsum if xsum is not None else dummy, s1,
        s2 if s2 is not None else dummy, sz if sz is not None else dummy, y, ws, cnt,
        M, N, K, (s2.stride(0) if s2 is not None else 0),
        MODE=mode, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT_K=split,
        NUM_STAGES=cfg["num_stages"], SWAP=cfg.get("SWAP", True),
        # the word-wide unpack is inline PTX, which the CPU interpreter cannot run
        FAST=cfg.get("FAST", x8.is_cuda), num_warps=cfg["num_warps"],
    )
    return y
