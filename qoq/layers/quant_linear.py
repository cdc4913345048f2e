"""Quantized linear layers: the exact integer arithmetic of the GEMM kernels (docs/formats.md).

forward(x) quantizes x per token to int8 (`quantize_per_token`), pads K to the kernels' multiple
of 128 with zero columns, and calls the kernel function, which dispatches itself: Triton on a
GPU, the torch reference twin (exact int arithmetic, in float64) on the CPU. forward also takes
a QuantizedActivation (qoq.layers.activation): int8 rows a fused RMSNorm or SiLU*mul kernel
already produced, which skips the separate quantization pass.

FakeQuantLinear is the float simulation, kept only as a cross-check and for formats no kernel
runs (the non-progressive RTN g128 baseline of the ablation ladder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qoq.kernels import (int_gemm, pack_w4, quantize_per_token, unpack_w4, use_triton, w4a8_g128_gemm,
                         w4a8_per_channel_gemm, w8a8_gemm)
from qoq.kernels.gemm_plan import act_prologue_allowed
from qoq.kernels.int_gemm import finish_ref
from qoq.kernels.w4a8_gemm import check_silu_mul
from qoq.kernels.quant import ACT_PLAIN, ActInput
from qoq.layers.activation import ROW_KERNELS_ONLY, DeferredActivation, QuantizedActivation
from qoq.layers.formats import W4ChannelParams, W4G128Params, W8Params, fake_quantize_act, padded_k


EXACT_CHUNK = 1024  # input channels per float32 partial product that stays exact (see QuantLinear._cpu_gemm)


def _identity(t: torch.Tensor) -> tuple:
    """Where a tensor's storage is and how often it was written in place (inference tensors keep
    no version counter, and cannot be written outside inference mode)."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return t.data_ptr(), None


class QuantLinear(nn.Module):
    """Base: int8 per-token activations in, the layer's dtype out (+ optional fp bias)."""

    kind = ""
    accepts_int8 = True  # forward takes a QuantizedActivation from a fused producer
    gemm_mode: int | None = None  # the shared GEMM kernel's mode (int_gemm.MODE_*)

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in = padded_k(in_features)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._int_weight: tuple[tuple, torch.Tensor] | None = None  # (key, cached float32 integer weight)

    def gemm(self, x8: torch.Tensor, x_scale: torch.Tensor, x_sum: torch.Tensor, silu_mul: bool = False):
        raise NotImplementedError

    def int_weight(self) -> torch.Tensor:
        """The weight's integers as the kernel multiplies them ([N, Kp]: Q8', q4 or w8)."""
        raise NotImplementedError

    def scale_accumulator(self, acc: torch.Tensor, x_scale: torch.Tensor, x_sum: torch.Tensor) -> torch.Tensor:
        """float64 [M, N] sum_k x8 * w_int -> the layer's float output, as the reference twin scales it."""
        raise NotImplementedError

    def _cpu_gemm(self, x8, x_scale, x_sum, silu_mul: bool):
        """The reference twin's arithmetic, bit for bit, with the integer weight unpacked once and
        kept (the twin rebuilds it on every call): float32 GEMMs over chunks of 1,024 input channels
        are exact (|x8 * w| <= 127 * 128, so every partial sum stays below 2^24), summed in float64."""
        buffers = tuple(_identity(t) for t in self.buffers() if t is not self.bias)
        if self._int_weight is None or self._int_weight[0] != buffers:
            self._int_weight = (buffers, self.int_weight().float().contiguous())
        w = self._int_weight[1]
        acc = None
        for k0 in range(0, w.shape[1], EXACT_CHUNK):
            part = (x8[:, k0:k0 + EXACT_CHUNK].float() @ w[:, k0:k0 + EXACT_CHUNK].T).double()
            acc = part if acc is None else acc.add_(part)
        return finish_ref(self.scale_accumulator(acc, x_scale, x_sum), silu_mul)

    def gemm_plan(self, num_tokens: int):
        """The kernel plan (int_gemm.gemm_plan) this layer's GEMM runs for a batch of num_tokens."""
        device = next(self.buffers()).device
        return int_gemm.gemm_plan(num_tokens, self.out_features, self.padded_in, self.gemm_mode, device)

    def fuses_silu_mul(self, num_tokens: int) -> bool:
        """Whether this [gate | up] projection computes silu(gate) * up in its GEMM's epilogue for
        a batch of num_tokens (its plan says, through int_gemm.fused_silu_mul); the MLP asks before
        choosing its path."""
        device = next(self.buffers()).device
        return self.bias is None and int_gemm.fused_silu_mul(num_tokens, self.out_features, self.padded_in,
                                                              self.gemm_mode, device)

    def quantizes_input(self, num_tokens: int) -> bool:
        """Whether this layer's GEMM quantizes its own input rows for a batch of num_tokens
        (int_gemm.quantizes_input: a decode-sized batch on a GPU whose plan says so); a norm before
        it then hands it a DeferredActivation, and a plain input skips quantize_per_token."""
        if not act_prologue_allowed(num_tokens):  # before the buffer and plan lookups
            return False
        device = next(self.buffers()).device
        return int_gemm.quantizes_input(num_tokens, self.out_features, self.padded_in, self.gemm_mode, device)

    def gemm_operands(self) -> tuple:
        """(weight, s1, s2, sz) as int_gemm takes them (None where the mode has none)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor | QuantizedActivation | DeferredActivation,
                silu_mul: bool = False) -> torch.Tensor:
        """silu_mul: this is a [gate | up] projection; return silu(gate) * up (out_features / 2 wide)."""
        if isinstance(x, DeferredActivation):
            if not silu_mul and use_triton(x.act.x) and self.quantizes_input(x.act.x.shape[0]):
                return self._finish(int_gemm.int8_gemm_act_triton(x.act, *self.gemm_operands(), self.gemm_mode),
                                    x.shape, x.dtype)
            x = x.quantized()
        if (not isinstance(x, QuantizedActivation) and not silu_mul and use_triton(x) and not ROW_KERNELS_ONLY.get()
                and self.quantizes_input(x.numel() // x.shape[-1])):
            act = ActInput(x.reshape(-1, self.in_features).contiguous(), ACT_PLAIN)
            return self._finish(int_gemm.int8_gemm_act_triton(act, *self.gemm_operands(), self.gemm_mode),
                                x.shape[:-1], x.dtype)
        if isinstance(x, QuantizedActivation):
            x8, x_scale, x_sum, lead, dtype = x
        else:
            lead, dtype = x.shape[:-1], x.dtype
            x8, x_scale, x_sum = quantize_per_token(x.reshape(-1, self.in_features))
        if self.padded_in != self.in_features:
            # Zero columns change neither the per-token scale nor the sum.
            x8 = F.pad(x8, (0, self.padded_in - self.in_features))
        if silu_mul and self.bias is not None:
            raise ValueError("silu_mul in the GEMM needs a projection without bias")
        if use_triton(x8) and ROW_KERNELS_ONLY.get() and x8.shape[0] > 1:
            # the batch-invariant mode: one GEMM per row, so that every row runs the M = 1 plan (its
            # split-K partial sums and epilogue order) whatever the batch, as the float linears do
            y = torch.cat([self.gemm(x8[i:i + 1], x_scale[i:i + 1], None if x_sum is None else x_sum[i:i + 1],
                                     silu_mul) for i in range(x8.shape[0])])
        elif use_triton(x8):
            y = self.gemm(x8, x_scale, x_sum, silu_mul)
        else:
            check_silu_mul(silu_mul, self.out_features)
            y = self._cpu_gemm(x8, x_scale, x_sum, silu_mul)
        return self._finish(y, lead, dtype)

    def _finish(self, y: torch.Tensor, lead, dtype) -> torch.Tensor:
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class W4A8G128Linear(QuantLinear):
    kind = "w4a8_g128"
    gemm_mode = int_gemm.MODE_W4_G128

    def __init__(self, in_features: int, params: W4G128Params, bias: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None) -> None:
        super().__init__(in_features, params.s1.shape[0], bias)
        self.group_size = params.group_size
        self.register_buffer("qweight", pack_w4(params.q4) if packed is None else packed)
        self.register_buffer("s1", params.s1.to(torch.float16))
        self.register_buffer("s2", params.s2.to(torch.int8))
        self.register_buffer("sz", params.sz.to(torch.int8))

    def gemm(self, x8, x_scale, x_sum, silu_mul=False):
        return w4a8_g128_gemm(x8, x_scale, self.qweight, self.s1, self.s2, self.sz, self.group_size, silu_mul=silu_mul)

    def gemm_operands(self):
        return self.qweight, self.s1, self.s2, self.sz

    def int_weight(self):
        step = self.s2.to(torch.int32).repeat_interleave(self.group_size, dim=1)
        zero = self.sz.to(torch.int32).repeat_interleave(self.group_size, dim=1)
        q8 = unpack_w4(self.qweight).to(torch.int32) * step - zero
        if int(q8.min()) < -128 or int(q8.max()) > 127:
            raise ValueError("q4 * s2 - sz leaves int8: s2/sz are not a valid progressive quantization")
        return q8

    def scale_accumulator(self, acc, x_scale, x_sum):
        return acc * x_scale.double()[:, None] * self.s1.double()[None, :]


class W4A8PerChannelLinear(QuantLinear):
    kind = "w4a8_per_channel"
    gemm_mode = int_gemm.MODE_W4_PER_CHANNEL

    def __init__(self, in_features: int, params: W4ChannelParams, bias: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None) -> None:
        super().__init__(in_features, params.scale.shape[0], bias)
        self.register_buffer("qweight", pack_w4(params.q4) if packed is None else packed)
        self.register_buffer("s1", params.scale.to(torch.float16))
        self.register_buffer("szero", params.szero.to(torch.float16))

    def gemm(self, x8, x_scale, x_sum, silu_mul=False):
        return w4a8_per_channel_gemm(x8, x_scale, x_sum, self.qweight, self.s1, self.szero, silu_mul=silu_mul)

    def gemm_operands(self):
        return self.qweight, self.s1, None, self.szero

    def int_weight(self):
        return unpack_w4(self.qweight)

    def scale_accumulator(self, acc, x_scale, x_sum):
        y = acc * x_scale.double()[:, None] * self.s1.double()[None, :]
        return y - self.szero.double()[None, :] * x_sum.double()[:, None]


class W8A8Linear(QuantLinear):
    kind = "w8a8"
    gemm_mode = int_gemm.MODE_W8

    def __init__(self, in_features: int, params: W8Params, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, params.scale.shape[0], bias)
        self.register_buffer("weight", params.w8.to(torch.int8))
        self.register_buffer("s", params.scale.to(torch.float16))

    def gemm(self, x8, x_scale, x_sum, silu_mul=False):
        return w8a8_gemm(x8, x_scale, self.weight, self.s, silu_mul=silu_mul)

    def gemm_operands(self):
        return self.weight, self.s, None, None

    def int_weight(self):
        return self.weight

    def scale_accumulator(self, acc, x_scale, x_sum):
        return acc * x_scale.double()[:, None] * self.s.double()[None, :]


class FakeQuantLinear(nn.Module):
    """Float simulation: per-token int8 fake-quant of x, then a float GEMM on a dequantized W."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, act_bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act_bits = act_bits
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize_act(x) if self.act_bits == 8 else x.float()
        return F.linear(xq.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def make_quant_linear(params, in_features: int, bias: torch.Tensor | None = None) -> QuantLinear:
    """The QuantLinear for a params dataclass of qoq.layers.formats."""
    if isinstance(params, W4G128Params):
        return W4A8G128Linear(in_features, params, bias)
    if isinstance(params, W4ChannelParams):
        return W4A8PerChannelLinear(in_features, params, bias)
    if isinstance(params, W8Params):
        return W8A8Linear(in_features, params, bias)
    raise TypeError(f"no quantized linear for {type(params).__name__}")
