"""Weights to the integers the kernels consume (docs/quantization.md#progressive-group-quantization).

Every 4-bit format keeps zero exactly representable (the range is widened to include 0), so zero
padding columns dequantize to exactly 0 and the per-token activation scale ignores them.
`clip` is a ratio (scalar, [N] or [N, G]) that shrinks the range before the scale is chosen.
"""

from __future__ import annotations

import torch

from qoq.config import Granularity
from qoq.layers.formats import KERNEL_K_MULTIPLE, W4ChannelParams, W4G128Params, W8Params, pad_k

PROTECTIVE_MAX = 119  # |Q8| <= 119 keeps round(Q8 / s2) * s2 within int8 for any s2 <= 16 (docs/formats.md#progressive-w4-g128)


class QuantFormatError(ValueError):
    """A weight shape or option that a quantized format cannot express."""


def _ratio(clip, shape, device) -> torch.Tensor:
    if clip is None:
        return torch.ones(shape, device=device)
    return torch.as_tensor(clip, dtype=torch.float32, device=device).expand(shape)


def _fp16_positive(x: torch.Tensor) -> torch.Tensor:
    # fp16 has a smallest normal of 6e-5; all-zero rows still need a usable, nonzero scale.
    return x.clamp(min=1e-6).to(torch.float16)


def quantize_w4_g128(w: torch.Tensor, clip=None, channel_clip=None) -> W4G128Params:
    """Progressive two-level quantization of an [N, K] float weight (K padded to 128) in groups of
    128, the kernels' K chunk (docs/quantization.md#progressive-group-quantization).

    `channel_clip` shrinks the level-1 (per output channel) range: one outlier weight otherwise
    sets a coarse int8 step for the whole row, and every group of that row inherits it."""
    group_size = KERNEL_K_MULTIPLE
    w = pad_k(w.float())
    n, k = w.shape
    groups = k // group_size
    s1 = _fp16_positive(w.abs().amax(dim=1) * _ratio(channel_clip, (n,), w.device) / PROTECTIVE_MAX)
    # in place where a pass would otherwise allocate: these run ~40 times per linear in the searches
    q8 = torch.div(w, s1.float()[:, None]).round_().clamp_(-PROTECTIVE_MAX, PROTECTIVE_MAX)
    g = q8.view(n, groups, group_size)
    r = _ratio(clip, (n, groups), w.device)
    lo = g.amin(-1).clamp(max=0) * r
    hi = g.amax(-1).clamp(min=0) * r
    # ceil: the 15 steps cover the (clipped) range; <= 16 because the range is <= 238.
    s2 = torch.ceil((hi - lo) / 15).clamp(1, 16)
    z = torch.round(-lo / s2).clamp(0, 15)
    q4 = g.div_(s2[..., None]).round_().add_(z[..., None]).clamp_(0, 15)
    return W4G128Params(
        q4=q4.view(n, k).to(torch.uint8), s1=s1, s2=s2.to(torch.int8), sz=(z * s2).to(torch.int8),
    )


def quantize_w4_per_channel(w: torch.Tensor, clip=None) -> W4ChannelParams:
    w = pad_k(w.float())
    n = w.shape[0]
    r = _ratio(clip, (n,), w.device)
    lo = w.amin(1).clamp(max=0) * r
    hi = w.amax(1).clamp(min=0) * r
    scale = _fp16_positive((hi - lo) / 15)
    s = scale.float()
    z = torch.round(-lo / s).clamp(0, 15)
    q4 = (torch.round(w / s[:, None]) + z[:, None]).clamp(0, 15)
    return W4ChannelParams(q4=q4.to(torch.uint8), scale=scale, szero=(z * s).to(torch.float16))


def quantize_w8(w: torch.Tensor, clip=None) -> W8Params:
    w = pad_k(w.float())
    r = _ratio(clip, (w.shape[0],), w.device)
    scale = _fp16_positive(w.abs().amax(1) * r / 127)
    w8 = torch.round(w / scale.float()[:, None]).clamp(-127, 127)
    return W8Params(w8=w8.to(torch.int8), scale=scale)


def fake_w4_group_rtn(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Plain (non-progressive) per-group asymmetric uint4 with float scales: the RTN baseline.

    No integer kernel runs this format; it exists only as the float simulation the ablation
    ladder starts from.
    """
    wp = pad_k(w.float())
    n, k = wp.shape
    g = wp.view(n, k // group_size, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    z = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(g / scale[..., None]) + z[..., None]).clamp(0, 15)
    return ((q - z[..., None]) * scale[..., None]).view(n, k)[:, : w.shape[1]]


def quantize_weight(w: torch.Tensor, weight_bits: int, granularity: Granularity, clip=None):
    """The params of `w` in the format a precision asks for (granularity: 4-bit weights only)."""
    if weight_bits == 8:
        return quantize_w8(w, clip)
    if weight_bits != 4:
        raise QuantFormatError(f"weights must be 4 or 8 bits, got {weight_bits}")
    if granularity.per_channel:
        return quantize_w4_per_channel(w, clip)
    if isinstance(clip, tuple):  # (level-1 ratio per channel, level-2 ratio per group)
        return quantize_w4_g128(w, clip[1], clip[0])
    return quantize_w4_g128(w, clip)


def fake_quantize_weight(w: torch.Tensor, weight_bits: int, granularity: Granularity, clip=None) -> torch.Tensor:
    """Dequantized float weight [N, K] of `quantize_weight` (padding dropped)."""
    return quantize_weight(w, weight_bits, granularity, clip).dequantize()[:, : w.shape[1]]
