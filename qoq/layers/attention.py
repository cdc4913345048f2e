"""The attention seam and its dense backend: CausalAttention, no cache (perplexity, calibration).

The model hands each backend q/k/v for one layer; the backend owns RoPE, the cache and the mask.
Generation runs the serving engine's paged backend (engine/attention.py) through the same call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from qoq.kernels import dequantize_kv_ref, quantize_kv_ref
from qoq.kernels.kv_cache import qk_hadamard_ref
from qoq.layers.rotary import RotaryEmbedding


class AttentionBackend(Protocol):
    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        """q: [B, T, Hq, D], k/v: [B, T, Hkv, D], not yet rotated -> [B, T, Hq, D].

        The backend applies RoPE itself, so a paged backend can fuse it with the KV-cache write.
        """
        ...


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, T, H, D] -> [B, H, T, D]; softmax math in fp32 (docs/formats.md#precisions).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(),
        k.transpose(1, 2).float(),
        v.transpose(1, 2).float(),
        is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2).to(q.dtype)


def kv_quantizer_for(kv_bits: int):
    """The dense paths' KV quantization: x [..., head_dim] -> its KV4/KV8 value (per token-head,
    asymmetric, the kernels' quantize_kv_ref / dequantize_kv_ref), or None for a 16-bit cache."""
    if kv_bits >= 16:
        return None
    if kv_bits not in (4, 8):
        raise ValueError(f"KV cache bits must be 4, 8 or 16, got {kv_bits}")
    def quantize(x: torch.Tensor) -> torch.Tensor:
        data, scale, zero = quantize_kv_ref(x, kv_bits)
        return dequantize_kv_ref(data, scale, zero, kv_bits, dtype=x.dtype)

    return quantize


def rope_qk(q, k, positions, rotary, qk_hadamard: bool):
    """RoPE, then the qk Hadamard when the model's quant config has it (as rope_kv_write does)."""
    q, k = rotary(positions, q, k)
    if qk_hadamard:
        q, k = qk_hadamard_ref(q).to(q.dtype), qk_hadamard_ref(k).to(k.dtype)
    return q, k


class CausalAttention:
    """No cache: each call attends causally within the given tokens (perplexity, calibration).

    With kv_bits 4 or 8, attention reads K (after RoPE) and V as a quantized cache would return
    them, so perplexity measures the KV4/KV8 model. With qk_hadamard, q and k are rotated after
    RoPE as the serving kernels rotate them.
    """

    def __init__(self, kv_bits: int = 16, qk_hadamard: bool = False) -> None:
        self.kv_quantizer = kv_quantizer_for(kv_bits)
        self.qk_hadamard = qk_hadamard

    def __call__(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        q, k = rope_qk(q, k, positions, rotary, self.qk_hadamard)
        return self.attend(q, k, v)

    def attend(self, q, k, v) -> torch.Tensor:
        """Causal attention of q and k as RoPE (and the qk Hadamard) left them."""
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k), self.kv_quantizer(v)
        return _causal_sdpa(q, k, v)
