"""W4A8 GEMMs, per-group g128 progressive and per-channel, fp16 out [M, N]
(docs/formats.md#progressive-w4-g128, docs/formats.md#per-channel-w4).

Both take the *packed* weight of `pack_w4` (docs/formats.md#packed-w4-layout). The references unpack
with torch and accumulate in float64, which is exact here: |x8 * q8| <= 127 * 128 and K <= 2^20
keep every partial sum far below 2^53.
"""

from __future__ import annotations

import torch

from qoq.kernels.dispatch import dispatch
from qoq.kernels.int_gemm import (
    MODE_W4_G128,
    MODE_W4_PER_CHANNEL,
    PACK_BLOCK,
    finish_ref,
    int8_gemm_triton,
)


def pack_w4(q4: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K // 2] in the kernels' chunked nibble layout."""
    if q4.dim() != 2 or q4.shape[1] % PACK_BLOCK:
        raise ValueError(f"pack_w4 needs [N, K] with K % {PACK_BLOCK} == 0, got {tuple(q4.shape)}")
    n, k = q4.shape
    q = q4.to(torch.uint8).reshape(n, k // PACK_BLOCK, 2, PACK_BLOCK // 2)
    if int(q.max()) > 15:
        raise ValueError("pack_w4: values must be in 0..15")
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_w4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_w4`: uint8 [N, K // 2] -> uint8 [N, K]."""
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] % (PACK_BLOCK // 2):
        raise ValueError(f"unpack_w4 needs uint8 [N, K/2] with K % {PACK_BLOCK} == 0")
    n, kh = packed.shape
    p = packed.reshape(n, kh // (PACK_BLOCK // 2), 1, PACK_BLOCK // 2)
    return torch.cat([p & 0xF, p >> 4], dim=2).reshape(n, kh * 2)


def check_silu_mul(silu_mul: bool, rows: int) -> None:
    if silu_mul and rows % 2:
        raise ValueError(f"silu_mul needs weight rows [gate | up], an even count; got {rows}")


def _check_common(x8, x_scale, packed, s1):
    if x8.dim() != 2 or x8.dtype != torch.int8:
        raise ValueError(f"x must be int8 [M, K], got {x8.dtype} {tuple(x8.shape)}")
    m, k = x8.shape
    if k % PACK_BLOCK:
        raise ValueError(f"K={k} must be a multiple of {PACK_BLOCK}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 != k:
        raise ValueError(f"packed weight must be uint8 [N, K/2={k // 2}], got {tuple(packed.shape)}")
    n = packed.shape[0]
    if x_scale.shape != (m,) or x_scale.dtype != torch.float32:
        raise ValueError(f"x_scale must be float32 [{m}], got {x_scale.dtype} {tuple(x_scale.shape)}")
    if s1.shape != (n,):
        raise ValueError(f"channel scale must be [{n}], got {tuple(s1.shape)}")
    return m, n, k


def _check_g128(x8, x_scale, packed, s1, s2, sz, group_size):
    m, n, k = _check_common(x8, x_scale, packed, s1)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}")
    g = k // group_size
    if s2.shape != (n, g) or sz.shape != (n, g):
        raise ValueError(f"s2 and sz must be [{n}, {g}], got {tuple(s2.shape)}, {tuple(sz.shape)}")
    if s2.dtype not in (torch.int8, torch.uint8) or sz.dtype not in (torch.int8, torch.uint8):
        raise ValueError("s2 and sz must be int8/uint8")


def _check_per_channel(x8, x_scale, x_sum, packed, s, szero):
    m, n, _ = _check_common(x8, x_scale, packed, s)
    if x_sum is None or x_sum.shape != (m,) or x_sum.dtype != torch.float32:
        raise ValueError(f"x_sum must be float32 [{m}] (per-token sum of the dequantized x)")
    if szero.shape != (n,):
        raise ValueError(f"szero must be [{n}], got {tuple(szero.shape)}")


def w4a8_g128_gemm_ref(x8, x_scale, packed, s1, s2, sz, group_size: int = 128, silu_mul: bool = False):
    """Y[m, n] = sx[m] * s1[n] * sum_k x8[m, k] * (q4 * s2 - sz)[n, k], fp16 [M, N].

    silu_mul (every GEMM has it): the weight's rows are [gate | up] and the result is
    silu(gate) * up, fp16 [M, N / 2], the MLP's activation (fused into the GEMM where
    `int_gemm.fused_silu_mul` says so)."""
    _check_g128(x8, x_scale, packed, s1, s2, sz, group_size)
    check_silu_mul(silu_mul, packed.shape[0])
    q4 = unpack_w4(packed).to(torch.int32)
    step = s2.to(torch.int32).repeat_interleave(group_size, dim=1)
    zero = sz.to(torch.int32).repeat_interleave(group_size, dim=1)
    q8 = q4 * step - zero
    if int(q8.min()) < -128 or int(q8.max()) > 127:
        # The kernel computes Q8' in byte lanes; out-of-range data would silently wrap there.
        raise ValueError("q4 * s2 - sz leaves int8: s2/sz are not a valid progressive quantization")
    acc = x8.to(torch.float64) @ q8.to(torch.float64).T
    y = acc * x_scale.double()[:, None] * s1.double()[None, :]
    return finish_ref(y, silu_mul)


def w4a8_g128_gemm_triton(x8, x_scale, packed, s1, s2, sz, group_size: int = 128, silu_mul: bool = False,
                          config=None):
    _check_g128(x8, x_scale, packed, s1, s2, sz, group_size)
    check_silu_mul(silu_mul, packed.shape[0])
    if group_size != PACK_BLOCK:
        raise ValueError(f"the Triton W4A8 kernel runs group_size={PACK_BLOCK} only")
    return int8_gemm_triton(
        x8.contiguous(), x_scale.contiguous(), None, packed.contiguous(), s1.contiguous(),
        s2.contiguous(), sz.contiguous(), MODE_W4_G128, config, silu_mul,
    )


def w4a8_per_channel_gemm_ref(x8, x_scale, x_sum, packed, s, szero, silu_mul: bool = False):
    """Y[m, n] = sx[m] * s[n] * sum_k x8 * q4 - szero[n] * x_sum[m], fp16 [M, N] (silu_mul as above)."""
    _check_per_channel(x8, x_scale, x_sum, packed, s, szero)
    check_silu_mul(silu_mul, packed.shape[0])
    q4 = unpack_w4(packed).to(torch.float64)
    acc = x8.to(torch.float64) @ q4.T
    y = acc * x_scale.double()[:, None] * s.double()[None, :]
    y = y - szero.double()[None, :] * x_sum.double()[:, None]
    return finish_ref(y, silu_mul)


def w4a8_per_channel_gemm_triton(x8, x_scale, x_sum, packed, s, szero, silu_mul: bool = False, config=None):
    _check_per_channel(x8, x_scale, x_sum, packed, s, szero)
    check_silu_mul(silu_mul, packed.shape[0])
    return int8_gemm_triton(
        x8.contiguous(), x_scale.contiguous(), x_sum.contiguous(), packed.contiguous(),
        s.contiguous(), None, szero.contiguous(), MODE_W4_PER_CHANNEL, config, silu_mul,
    )


w4a8_g128_gemm = dispatch(w4a8_g128_gemm_ref, w4a8_g128_gemm_triton)
w4a8_per_channel_gemm = dispatch(w4a8_per_channel_gemm_ref, w4a8_per_channel_gemm_triton)
