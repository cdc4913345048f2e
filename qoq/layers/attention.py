"""Attention backends for the dense (non-paged) paths: perplexity, calibration and generation.

The model hands each backend rotated q/k and v for one layer; the backend owns the cache and the
mask. The serving engine plugs its paged backend in through the same call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    # [B, T, H, D] -> [B, H, T, D]; softmax math in fp32 (SPEC: attention math stays high precision).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(),
        k.transpose(1, 2).float(),
        v.transpose(1, 2).float(),
        attn_mask=mask,
        is_causal=causal,
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
    from qoq.kernels import dequantize_kv_ref, quantize_kv_ref

    def quantize(x: torch.Tensor) -> torch.Tensor:
        data, scale, zero = quantize_kv_ref(x, kv_bits)
        return dequantize_kv_ref(data, scale, zero, kv_bits, dtype=x.dtype)

    return quantize


class CausalAttention:
    """No cache: each call attends causally within the given tokens (perplexity, calibration).

    With kv_bits 4 or 8, attention reads K (after RoPE) and V as a quantized cache would return
    them, so perplexity measures the KV4/KV8 model.
    """

    def __init__(self, kv_bits: int = 16) -> None:
        self.kv_quantizer = kv_quantizer_for(kv_bits)

    def __call__(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        q, k = rotary(positions, q, k)
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k), self.kv_quantizer(v)
        return _sdpa(q, k, v, None, causal=True)


class DenseKVCache:
    """Contiguous per-sequence KV cache for a left-padded batch that advances in lock step.

    `kv_quantizer` (or `kv_bits` 4/8, the model's quant_config.kv_bits) maps a [B, T, Hkv, D]
    tensor to its dequantized KV4/KV8 value, so the cache holds exactly what a quantized cache
    would return.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pad_lens: torch.Tensor | None = None,
        kv_quantizer=None,
        kv_bits: int = 16,
    ) -> None:
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0
        self.pad_lens = pad_lens if pad_lens is not None else torch.zeros(batch_size, dtype=torch.long)
        self.pad_lens = self.pad_lens.to(device)
        self.kv_quantizer = kv_quantizer if kv_quantizer is not None else kv_quantizer_for(kv_bits)

    def __call__(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        q, k = rotary(positions, q, k)
        num_new = q.shape[1]
        end = self.length + num_new
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > capacity {self.max_len}")
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k), self.kv_quantizer(v)
        self.k[layer_idx][:, self.length : end] = k
        self.v[layer_idx][:, self.length : end] = v
        key_pos = torch.arange(end, device=q.device)
        query_pos = torch.arange(self.length, end, device=q.device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None] & (key_pos[None, None, :] >= self.pad_lens[:, None, None])
        return _sdpa(q, self.k[layer_idx][:, :end], self.v[layer_idx][:, :end], mask[:, None], causal=False)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
