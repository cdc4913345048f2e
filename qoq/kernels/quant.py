"""Fused producers of per-token INT8 activations (docs/formats.md#activations).

Each returns (x8 int8 [M, H], scale fp32 [M], xsum fp32 [M]):
  scale = max|y_row| / 127 (0 for an all-zero row), x8 = clamp(round(y / scale), -127, 127),
  xsum = scale * sum(x8), the row sum of the *dequantized* activation that the per-channel
  W4A8 GEMM needs for its zero-point term.
- rmsnorm_quant(x, weight, eps): y = x * rsqrt(mean(x^2) + eps) * weight, all in fp32 (no
  round trip through fp16 between the norm and the quantizer). weight None = folded away.
- silu_mul_quant(gate_up): gate_up = [gate | up] along the last dim, y = silu(gate) * up.
- quantize_per_token(x): y = x.
rmsnorm(x, weight, eps) and silu_mul(gate_up) are the same row kernels writing y in x's dtype
instead of int8: the full-precision (w16a16) model's fused norm and activation.
add_rmsnorm_quant(x, residual, weight, eps) / add_rmsnorm(...) first add the residual stream,
s = x + residual (rounded to x's dtype, exactly as the unfused add), and return s as well: the
decoder's residual add and the next norm in one pass over the rows.

Triton: one program per row holds the whole row in registers (H up to 16K
channels), so the row is read once and written once as int8: memory-bound by design.
Rounding is round-half-to-even in both twins (torch.round; in Triton the 1.5 * 2^23 trick,
since libdevice's rint is not available in the interpreter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qoq.kernels.dispatch import dispatch, lazy_jit, pdl_enter, pdl_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

_PLAIN, _RMSNORM, _SILU_MUL = 0, 1, 2
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds fp32 to nearest even


def _quantize_rows_ref(y: torch.Tensor):
    y = y.float()
    scale = y.abs().amax(dim=-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x8 = torch.round(y / safe[:, None]).clamp(-127, 127)
    xsum = x8.sum(-1) * scale
    return x8.to(torch.int8), scale, xsum


def _check_2d(x, name):
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating [M, H] tensor, got {x.dtype} {tuple(x.shape)}")


def rmsnorm_quant_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float):
    return _quantize_rows_ref(rmsnorm_ref(x.float(), weight, eps))  # fp32 throughout


def silu_mul_quant_ref(gate_up: torch.Tensor):
    return _quantize_rows_ref(silu_mul_ref(gate_up.float()))


def quantize_per_token_ref(x: torch.Tensor):
    _check_2d(x, "x")
    return _quantize_rows_ref(x)


def _check_residual(x, residual):
    _check_2d(x, "x")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                         f"{tuple(residual.shape)}")


def add_rmsnorm_quant_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float):
    _check_residual(x, residual)
    s = x + residual
    return (*rmsnorm_quant_ref(s, weight, eps), s)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float):
    _check_residual(x, residual)
    s = x + residual
    return rmsnorm_ref(s, weight, eps), s


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight in fp32, returned in x's dtype (as HF Llama does)."""
    _check_2d(x, "x")
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    _check_2d(gate_up, "gate_up")
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@lazy_jit
def _row_quant_kernel(
    x_ptr, w_ptr, q_ptr, scale_ptr, sum_ptr, r_ptr, s_ptr, H, stride_x, eps,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
    ADD: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # wait for the kernel before; the GEMM after may launch and prefetch its weights
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    base = x_ptr + row.to(tl.int64) * stride_x
    if MODE == 2:
        g = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + H + offs, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
    else:
        y = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # the residual stream: s = x + residual in x's dtype, stored, then normalized
        r = tl.load(r_ptr + row.to(tl.int64) * H + offs, mask=mask, other=0.0).to(tl.float32)
        y = (y + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row.to(tl.int64) * H + offs, y, mask=mask)
        y = y.to(tl.float32)
    if MODE == 1:
        ms = tl.sum(y * y, axis=0) / H
        y = y * (1.0 / tl.sqrt(ms + eps))
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if not QUANT:  # full-precision output in q_ptr's dtype
        tl.store(q_ptr + row.to(tl.int64) * H + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
        return
    scale = tl.max(tl.abs(y), axis=0) / 127.0
    safe = tl.where(scale > 0, scale, 1.0)
    r = y / safe
    r = (r + 12582912.0) - 12582912.0
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(q_ptr + row.to(tl.int64) * H + offs, r.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(sum_ptr + row, tl.sum(r, axis=0) * scale)


def _launch(x, weight, eps, mode, h, quant=True, residual=None):
    m = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = None
    if residual is not None:
        residual = residual.contiguous()
        s = torch.empty_like(residual)
    q = torch.empty((m, h), dtype=torch.int8 if quant else x.dtype, device=x.device)
    scale = torch.empty(m if quant else 0, dtype=torch.float32, device=x.device)
    xsum = torch.empty(m if quant else 0, dtype=torch.float32, device=x.device)
    if m > 0:
        block = triton.next_power_of_2(h)
        num_warps = max(1, min(16, block // 512))
        _row_quant_kernel[(m,)](
            x, weight if weight is not None else x, q, scale, xsum,
            residual if residual is not None else x, s if s is not None else x, h, x.stride(0), eps,
            MODE=mode, HAS_WEIGHT=weight is not None, BLOCK=block, QUANT=quant, ADD=residual is not None,
            num_warps=num_warps, **pdl_launch(x),
        )
    out = (q, scale, xsum) if quant else (q,)
    if s is not None:
        return (*out, s)
    return out if quant else q


def rmsnorm_quant_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float):
    _check_2d(x, "x")
    return _launch(x, weight, float(eps), _RMSNORM, x.shape[1])


def silu_mul_quant_triton(gate_up: torch.Tensor):
    _check_2d(gate_up, "gate_up")
    return _launch(gate_up, None, 0.0, _SILU_MUL, gate_up.shape[1] // 2)


def quantize_per_token_triton(x: torch.Tensor):
    _check_2d(x, "x")
    return _launch(x, None, 0.0, _PLAIN, x.shape[1])


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check_2d(x, "x")
    return _launch(x, weight, float(eps), _RMSNORM, x.shape[1], quant=False)


def add_rmsnorm_quant_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float):
    _check_residual(x, residual)
    return _launch(x, weight, float(eps), _RMSNORM, x.shape[1], residual=residual)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float):
    _check_residual(x, residual)
    return _launch(x, weight, float(eps), _RMSNORM, x.shape[1], quant=False, residual=residual)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    _check_2d(gate_up, "gate_up")
    return _launch(gate_up, None, 0.0, _SILU_MUL, gate_up.shape[1] // 2, quant=False)


rmsnorm = dispatch(rmsnorm_ref, rmsnorm_triton)
silu_mul = dispatch(silu_mul_ref, silu_mul_triton)
rmsnorm_quant = dispatch(rmsnorm_quant_ref, rmsnorm_quant_triton)
add_rmsnorm = dispatch(add_rmsnorm_ref, add_rmsnorm_triton)
add_rmsnorm_quant = dispatch(add_rmsnorm_quant_ref, add_rmsnorm_quant_triton)
silu_mul_quant = dispatch(silu_mul_quant_ref, silu_mul_quant_triton)
quantize_per_token = dispatch(quantize_per_token_ref, quantize_per_token_triton)


# What a decode-sized GEMM computes from fp16 rows in its own prologue (int_gemm's and gemv's ACT):
ACT_PLAIN, ACT_RMSNORM, ACT_ADD_RMSNORM = 1, 2, 3


class ActInput(NamedTuple):
    """Activation rows a GEMM quantizes itself: quantize_per_token(x) (ACT_PLAIN),
    rmsnorm_quant(x, weight, eps) (ACT_RMSNORM), or add_rmsnorm_quant(x, residual, weight, eps)
    with the residual sum written into `s` (ACT_ADD_RMSNORM). `act_quantize` is the same as
    one row kernel's pass (and the twins' reference)."""

    x: torch.Tensor  # [M, H] floating, contiguous
    kind: int
    residual: torch.Tensor | None = None  # [M, H] like x (ACT_ADD_RMSNORM)
    weight: torch.Tensor | None = None  # [H] norm weight (None: folded away)
    eps: float = 0.0
    s: torch.Tensor | None = None  # [M, H] out: x + residual (ACT_ADD_RMSNORM)


def act_quantize(act: ActInput):
    """(x8, scale, xsum) of `act` by its row kernel (or twin), and act.s filled where it has one."""
    if act.kind == ACT_PLAIN:
        return quantize_per_token(act.x)
    if act.kind == ACT_RMSNORM:
        return rmsnorm_quant(act.x, act.weight, act.eps)
    x8, scale, xsum, s = add_rmsnorm_quant(act.x, act.residual, act.weight, act.eps)
    act.s.copy_(s)
    return x8, scale, xsum


# The GEMMs' activation prologue (int_gemm ACT, gemv ACT): the same rows as the row kernels above,
# computed by the GEMM's programs from the fp16 rows.


@lazy_jit.helper
def _act_rows(xf_ptr, r_ptr, s_ptr, off, mask, store, ACT: tl.constexpr):
    """fp32 values of the activation rows at `off` (ACT_ADD_RMSNORM: x + r rounded to x's dtype,
    stored to s where `store`)."""
    v = tl.load(xf_ptr + off, mask=mask, other=0.0)
    if ACT == 3:
        v = (v.to(tl.float32) + tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)).to(v.dtype)
        tl.store(s_ptr + off, v, mask=mask & store)
    return v.to(tl.float32)


@lazy_jit.helper
def act_stats(xf_ptr, r_ptr, nw_ptr, s_ptr, offs_m, m_mask, H, eps, store,
              ACT: tl.constexpr, HAS_NW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr = 512):
    """(per-token scale = max|y| / 127, rsqrt(mean(x^2) + eps) or 1) of rows offs_m (a run of
    consecutive rows, those in m_mask valid) of the H-wide activation, y = x (ACT_PLAIN) or its
    RMSNorm: the valid rows one after another, each in steps of BLOCK channels over all the
    program's threads (a step's loads wait for the last step's, so a decode token's row takes
    H / BLOCK steps, not BLOCK_M times as many). The norm's factor is positive and per row, so
    max|y| = rsqrt(...) * max|x * nw| (the row kernel rounds (x * rsqrt) * nw instead: a code can
    differ by one where a value sits on a rounding edge)."""
    kk = tl.arange(0, BLOCK)
    idx = tl.arange(0, BLOCK_M)
    m0 = tl.min(offs_m, axis=0)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r in range(0, tl.sum(m_mask.to(tl.int32), axis=0)):
        row = (m0 + r).to(tl.int64) * H
        ss_r = tl.zeros((1,), dtype=tl.float32)  # reduced every step: few registers held
        amax_r = tl.zeros((1,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK):
            mask = k0 + kk < H
            v = _act_rows(xf_ptr, r_ptr, s_ptr, row + k0 + kk, mask, store, ACT)
            if ACT >= 2:
                ss_r += tl.sum(v * v, axis=0)
                if HAS_NW:
                    v = v * tl.load(nw_ptr + k0 + kk, mask=mask, other=0.0).to(tl.float32)
            amax_r = tl.maximum(amax_r, tl.max(tl.abs(v), axis=0))
        ss = tl.where(idx == r, tl.sum(ss_r, axis=0), ss)
        amax = tl.where(idx == r, tl.max(amax_r, axis=0), amax)
    inv = tl.full((BLOCK_M,), 1.0, tl.float32)
    if ACT >= 2:
        inv = 1.0 / tl.sqrt(ss / H + eps)
    return amax * inv / 127.0, inv


def act_block(H: int, num_warps: int) -> int:
    """Channels per step of the prologue's passes over a row: 32 a thread (the row's fp16 values
    in a few 16-byte loads per thread in flight at once), at most the row. The H100 profile of the
    quantizing gemv at 64 channels a step, one dependent load after another: 55 us a call against
    17.5 (benchmarks/results/decode-b1-ab-h100.json)."""
    return max(64, min(triton.next_power_of_2(H), 32 * 32 * num_warps))


@lazy_jit.helper
def act_codes(xf_ptr, r_ptr, nw_ptr, xf_base, col0, offs_h, x_mask, H, inv, safe,
              ACT: tl.constexpr, HAS_NW: tl.constexpr):
    """int8 codes [C, BM] of input channels col0 + offs_h (C of them) of the rows (X^T), as
    quant.py's row kernel rounds them (round half to even, clamped to +-127); channels from H on,
    and where x_mask is off, are 0."""
    cols = col0 + offs_h
    mask = x_mask & (cols < H)[:, None]
    v = tl.load(xf_ptr + xf_base + col0, mask=mask, other=0.0)
    if ACT == 3:
        v = (v.to(tl.float32) + tl.load(r_ptr + xf_base + col0, mask=mask, other=0.0).to(tl.float32)).to(v.dtype)
    y = v.to(tl.float32)
    if ACT >= 2:
        y = y * inv[None, :]
        if HAS_NW:
            y = y * tl.load(nw_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[:, None]
    q = y / safe[None, :]
    q = (q + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
