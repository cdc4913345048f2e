"""SmoothAttention (docs/quantization.md#smoothattention): flatten key outliers so a 4-bit KV cache keeps accuracy.

Q <- Q * lambda, K <- K / lambda per key channel, folded into W_q / W_k rows, so every attention
score q . k is unchanged. RoPE rotates channel i with channel i + d/2 (HF rotate_half), which
commutes with the scaling only when both channels share lambda: we take the max of the pair.
With GQA there is one lambda per kv head, applied to every query head of its group.
"""

from __future__ import annotations

import torch

from qoq.config import ModelConfig
from qoq.model.llama import Attention


def smooth_attention_scales(keys: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """keys [M, num_kv_heads, head_dim] post-RoPE -> lambda [num_kv_heads, head_dim]."""
    if keys.shape[-1] % 2:
        raise ValueError(f"SmoothAttention needs an even head_dim (RoPE pairs), got {keys.shape[-1]}")
    amax = keys.abs().amax(0).float().clamp(min=1e-5)
    half = amax.shape[-1] // 2
    pair = torch.maximum(amax[:, :half], amax[:, half:])
    # Post-RoPE maxima of a pair coincide in the limit; the max keeps lambda equal on both.
    return torch.cat([pair, pair], dim=-1).pow(alpha)


@torch.no_grad()
def apply_smooth_attention(attn: Attention, lam: torch.Tensor, config: ModelConfig) -> None:
    """Fold lambda [num_kv_heads, head_dim] into the q rows (x lambda) and k rows (/ lambda)."""
    lam = lam.to(attn.qkv_proj.weight.device, torch.float64)
    q_scale = lam.repeat_interleave(config.num_queries_per_kv, dim=0).reshape(-1)
    k_scale = 1.0 / lam.reshape(-1)
    row_scale = torch.cat([q_scale, k_scale, torch.ones(config.kv_size, dtype=torch.float64, device=lam.device)])
    _scale_rows(attn.qkv_proj, row_scale)


def _scale_rows(linear, scale: torch.Tensor) -> None:
    w = linear.weight
    w.copy_((w.double() * scale[:, None]).to(w.dtype))
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_((linear.bias.double() * scale).to(linear.bias.dtype))
