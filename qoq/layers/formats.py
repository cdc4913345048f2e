"""The number formats quantized linears hold and the GEMM kernels consume (docs/formats.md).

Both sides use them: the quantizer (qoq.quant) produces these params, the linears
(qoq.layers.quant_linear) and checkpoints (qoq.model.checkpoint) store them, so they live below
both. Every 4-bit format keeps zero exactly representable, so zero padding columns dequantize to
exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.kernels.quant import quantize_per_token_ref

KERNEL_K_MULTIPLE = 128  # the GEMM kernels tile K in chunks of 128 (one packed chunk / group)


@dataclass
class W4G128Params:
    """Progressive W4 (int8 per channel, then uint4 per group): Q8' = q4 * s2 - sz, W ~ s1 * Q8'
    (docs/formats.md#progressive-w4-g128)."""

    q4: torch.Tensor  # uint8 [N, Kp], values 0..15
    s1: torch.Tensor  # fp16 [N]
    s2: torch.Tensor  # int8 [N, G], 1..16
    sz: torch.Tensor  # int8 [N, G], z * s2 in 0..127
    group_size: int = KERNEL_K_MULTIPLE

    def dequantize(self) -> torch.Tensor:
        n, k = self.q4.shape
        q = self.q4.view(n, k // self.group_size, self.group_size).float()
        q.mul_(self.s2.float()[..., None]).sub_(self.sz.float()[..., None]).mul_(self.s1.float()[:, None, None])
        return q.view(n, k)


@dataclass
class W4ChannelParams:
    """Per-channel asymmetric uint4: W ~ q4 * s - szero (szero = z * s; docs/formats.md#per-channel-w4)."""

    q4: torch.Tensor  # uint8 [N, Kp]
    scale: torch.Tensor  # fp16 [N]
    szero: torch.Tensor  # fp16 [N]

    def dequantize(self) -> torch.Tensor:
        return self.q4.float() * self.scale.float()[:, None] - self.szero.float()[:, None]


@dataclass
class W8Params:
    """Per-channel symmetric int8 (SmoothQuant W8A8): W ~ w8 * s."""

    w8: torch.Tensor  # int8 [N, Kp]
    scale: torch.Tensor  # fp16 [N]

    def dequantize(self) -> torch.Tensor:
        return self.w8.float() * self.scale.float()[:, None]


def padded_k(k: int) -> int:
    return -(-k // KERNEL_K_MULTIPLE) * KERNEL_K_MULTIPLE


def pad_k(w: torch.Tensor) -> torch.Tensor:
    """Zero columns up to a multiple of 128 (hidden 576 -> 640): zeros cost nothing in the GEMM."""
    k = w.shape[-1]
    return torch.nn.functional.pad(w, (0, padded_k(k) - k)) if k % KERNEL_K_MULTIPLE else w


def fake_quantize_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 (the kernels' quantize_per_token), returned dequantized, float."""
    x8, scale, _ = quantize_per_token_ref(x.reshape(-1, x.shape[-1]))
    return (x8.float() * scale[:, None]).reshape(x.shape)
