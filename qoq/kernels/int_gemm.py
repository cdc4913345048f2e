"""The shared Triton INT8 tensor-core GEMM behind w4a8_gemm.py and w8a8_gemm.py.

Packed W4 layout (`pack_w4`): K is cut into chunks of 128 input channels (one g128 group);
byte j (0..63) of a chunk holds channel j in its low nibble and channel 64 + j in its high
nibble. A tile of one chunk therefore unpacks with one mask and one shift into two 64-wide
K halves that are each contiguous in X, and each half feeds its own `tl.dot`: no shuffles.

The kernel computes the transposed product Y^T = W' @ X^T ("swap AB"): the dequantized weight
tile is produced in registers, and a register operand may only be the A side of Hopper's
wgmma, while X^T (K-major in memory) is the B side read from shared memory. It also lets a
decode-sized M be the narrow N side of the MMA (down to 16) instead of padding it to 64.

MODE 0: W8A8 (int8 weights). MODE 1: W4A8 g128, Q8' = q4 * s2 - sz computed in uint8 lanes
(q4 * s2 <= 240 never overflows a byte, and the true Q8' is within int8, so the wrapped byte
reinterpreted as int8 is exact). MODE 2: W4A8 per-channel, q4 goes straight into the dot and
the zero is applied in the epilogue with the per-token activation sums.
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
    x_ptr, w_ptr, sx_ptr, xsum_ptr, s1_ptr, s2_ptr, sz_ptr, y_ptr,
    M, N, K, stride_sg,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, SWAP: tl.constexpr,
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
            lo = (p & 0xF).to(tl.uint8)
            hi = (p >> 4).to(tl.uint8)
            if MODE == 1:
                s2 = tl.load(s2_ptr + offs_n * stride_sg + c, mask=n_mask, other=0).to(tl.uint8)
                sz = tl.load(sz_ptr + offs_n * stride_sg + c, mask=n_mask, other=0).to(tl.uint8)
                w_lo = (lo * s2[:, None] - sz[:, None]).to(tl.uint8).to(tl.int8, bitcast=True)
                w_hi = (hi * s2[:, None] - sz[:, None]).to(tl.uint8).to(tl.int8, bitcast=True)
            else:
                w_lo = lo.to(tl.int8)
                w_hi = hi.to(tl.int8)
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
        y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
    else:
        y = acc.to(tl.float32) * sx[:, None] * s1[None, :]
        if MODE == 2:
            y = y - xsum[:, None] * szero[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, y, mask=mask)


def default_config(M: int, N: int, K: int, mode: int) -> dict:
    """Tiles by M bucket, from the H100 sweep (benchmarks/bench_kernels.py --sweep).

    The weight-as-A order (SWAP) won at every size there. Small M is weight-bandwidth bound:
    narrow 64-channel tiles and split-K until enough CTAs stream weights (g128 wants more
    splits: its in-register dequant makes each CTA slower, so it needs more of them).
    """
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
        want = 512 if mode == MODE_W4_G128 else 256
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
        want = 128
    elif M <= 256:
        block_m = 256 if M > 128 and N > 4096 else 128
        cfg = dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=4)
        want = 0
    else:
        cfg = dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3)
        want = 0
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = 1
    while tiles * split < want and (K // 128) // (split * 2) >= 4:
        split *= 2
    cfg["SPLIT_K"] = split
    cfg["SWAP"] = True
    return cfg


def int8_gemm_triton(x8, sx, xsum, w, s1, s2, sz, mode: int, config: dict | None = None):
    """Launch the shared kernel; inputs are validated by the callers."""
    M, K = x8.shape
    N = w.shape[0]
    cfg = dict(config or default_config(M, N, K, mode))
    split = cfg.pop("SPLIT_K", 1)
    if split == 1:
        y = torch.empty((M, N), dtype=torch.float16, device=x8.device)
    else:
        y = torch.zeros((M, N), dtype=torch.float32, device=x8.device)
    dummy = sx
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    _int8_gemm_kernel[grid](
        x8, w, sx, xsum if xsum is not None else dummy, s1,
        s2 if s2 is not None else dummy, sz if sz is not None else dummy, y,
        M, N, K, (s2.stride(0) if s2 is not None else 0),
        MODE=mode, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT_K=split,
        NUM_STAGES=cfg["num_stages"], SWAP=cfg.get("SWAP", True), num_warps=cfg["num_warps"],
    )
    return y if split == 1 else y.to(torch.float16)
