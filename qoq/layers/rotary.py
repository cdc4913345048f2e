"""Rotary position embedding (HF "rotate_half" convention), with Llama-3 and linear scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from qoq.config import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        ramp = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > low_wavelen, inv_freq / scaling.factor, torch.where(wavelen < high_wavelen, inv_freq, ramp)
        )
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds a [max_positions, head_dim] cache: cos in the first half, sin in the second."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    @classmethod
    def for_model(cls, config: ModelConfig) -> "RotaryEmbedding":
        return cls(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [..., Hq, D], k: [..., Hkv, D]; positions broadcast over the leading dims."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(-2).chunk(2, dim=-1)
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        q_rot = q.float() * cos + rotate_half(q.float()) * sin
        k_rot = k.float() * cos + rotate_half(k.float()) * sin
        return q_rot.to(q.dtype), k_rot.to(k.dtype)
