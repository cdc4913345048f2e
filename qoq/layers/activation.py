"""Int8 activations handed from a fused producer straight to a quantized linear.

A W4A8/W8A8 linear needs its input as int8 per token (+ scale and row sum). When the op before
it is an RMSNorm or SiLU*mul, one fused kernel (qoq.kernels.quant) computes the op and quantizes
in the same pass, so the fp16 activation is never written out and read back. The model asks a
linear whether it takes such input (`accepts_int8`) and then passes a QuantizedActivation instead
of a tensor.
"""

from __future__ import annotations

import contextvars
from typing import NamedTuple

import torch
from torch import nn

from qoq.kernels import add_rmsnorm_quant, rmsnorm_quant, silu_mul_quant
from qoq.kernels.quant import ActInput, act_quantize

# Set by the batch-invariant mode (engine/batch_invariant.py): every quantized linear then takes
# its input from a row kernel, whatever the batch (a GEMM that quantizes its own rows rounds the
# same values in another order, so a token's codes would depend on its batch's size).
ROW_KERNELS_ONLY = contextvars.ContextVar("qoq_row_kernels_only", default=False)


class QuantizedActivation(NamedTuple):
    x8: torch.Tensor  # [M, K] int8
    scale: torch.Tensor  # [M] fp32
    xsum: torch.Tensor  # [M] fp32: scale * row sum of x8
    shape: torch.Size  # the leading dims of the activation it stands for (M = their product)
    dtype: torch.dtype  # the dtype the activation would have had


class DeferredActivation(NamedTuple):
    """A norm's output not computed yet: the quantized linear it feeds either quantizes the rows in
    its own GEMM (a decode-sized batch whose plan says so) or has `quantized()` run the row kernel."""

    act: ActInput
    shape: torch.Size  # the leading dims of the activation it stands for
    dtype: torch.dtype

    def quantized(self) -> QuantizedActivation:
        x8, scale, xsum = act_quantize(self.act)
        return QuantizedActivation(x8, scale, xsum, self.shape, self.dtype)


def accepts_int8(linear: nn.Module) -> bool:
    return getattr(linear, "accepts_int8", False)


def quantizes_input(linear: nn.Module, num_tokens: int) -> bool:
    """Whether `linear` quantizes its input rows in its own GEMM at this many tokens (then a norm
    before it hands it a DeferredActivation)."""
    ask = getattr(linear, "quantizes_input", None)
    return ask is not None and not ROW_KERNELS_ONLY.get() and ask(num_tokens)


def num_rows(x: torch.Tensor | QuantizedActivation | DeferredActivation) -> int:
    """Tokens in an activation handed to a linear (M of its GEMM)."""
    if isinstance(x, QuantizedActivation):
        return x.x8.shape[0]
    if isinstance(x, DeferredActivation):
        return x.act.x.shape[0]
    return x.numel() // x.shape[-1]


def rmsnorm_quantized(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> QuantizedActivation:
    x8, scale, xsum = rmsnorm_quant(x.reshape(-1, x.shape[-1]), weight, eps)
    return QuantizedActivation(x8, scale, xsum, x.shape[:-1], x.dtype)


def add_rmsnorm_quantized(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                          eps: float) -> tuple[QuantizedActivation, torch.Tensor]:
    """(int8 rows of rmsnorm(x + residual), x + residual) in one pass."""
    flat = x.shape[-1]
    x8, scale, xsum, s = add_rmsnorm_quant(x.reshape(-1, flat), residual.reshape(-1, flat), weight, eps)
    return QuantizedActivation(x8, scale, xsum, x.shape[:-1], x.dtype), s.view(x.shape)


def silu_mul_quantized(gate_up: torch.Tensor) -> QuantizedActivation:
    x8, scale, xsum = silu_mul_quant(gate_up.reshape(-1, gate_up.shape[-1]))
    return QuantizedActivation(x8, scale, xsum, gate_up.shape[:-1], gate_up.dtype)
