"""W8A8 GEMM: per-token int8 activations x per-channel symmetric int8 weights, fp16 out.

Y[m, n] = sx[m] * s[n] * sum_k x8[m, k] * w[n, k]. Same Triton kernel as W4A8 (int_gemm.py,
MODE 0), so tiles and pipelining are shared; the reference accumulates exactly in float64.
"""

from __future__ import annotations

import torch

from qoq.kernels.dispatch import dispatch
from qoq.kernels.int_gemm import MODE_W8, PACK_BLOCK, finish_ref, int8_gemm_triton
from qoq.kernels.w4a8_gemm import check_silu_mul


def _check_w8a8(x8, x_scale, w, s):
    if x8.dim() != 2 or x8.dtype != torch.int8:
        raise ValueError(f"x must be int8 [M, K], got {x8.dtype} {tuple(x8.shape)}")
    m, k = x8.shape
    if w.dim() != 2 or w.dtype != torch.int8 or w.shape[1] != k:
        raise ValueError(f"w must be int8 [N, {k}], got {w.dtype} {tuple(w.shape)}")
    if k % PACK_BLOCK:
        raise ValueError(f"K={k} must be a multiple of {PACK_BLOCK}")
    if x_scale.shape != (m,) or x_scale.dtype != torch.float32:
        raise ValueError(f"x_scale must be float32 [{m}]")
    if s.shape != (w.shape[0],):
        raise ValueError(f"s must be [{w.shape[0]}], got {tuple(s.shape)}")


def w8a8_gemm_ref(x8, x_scale, w, s, silu_mul: bool = False):
    _check_w8a8(x8, x_scale, w, s)
    check_silu_mul(silu_mul, w.shape[0])
    acc = x8.to(torch.float64) @ w.to(torch.float64).T
    return finish_ref(acc * x_scale.double()[:, None] * s.double()[None, :], silu_mul)


def w8a8_gemm_triton(x8, x_scale, w, s, silu_mul: bool = False, config=None):
    _check_w8a8(x8, x_scale, w, s)
    check_silu_mul(silu_mul, w.shape[0])
    return int8_gemm_triton(
        x8.contiguous(), x_scale.contiguous(), None, w.contiguous(), s.contiguous(),
        None, None, MODE_W8, config, silu_mul,
    )


w8a8_gemm = dispatch(w8a8_gemm_ref, w8a8_gemm_triton)
