"""Attention backends for the dense (non-paged) paths: perplexity, calibration and generation.

The model hands each backend rotated q/k and v for one layer; the backend owns the cache and the
mask. The serving engine plugs its paged backend in through the same call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from qoq.kernels import (
    KVCacheLayer,
    allocate_kv_cache,
    dequantize_kv_ref,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention,
    quantize_kv_ref,
    rope_kv_write,
)
from qoq.kernels.kv_cache import check_hadamard_dim, qk_hadamard_ref
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
    # [B, T, H, D] -> [B, H, T, D]; softmax math in fp32 (docs/formats.md#precisions).
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
    def quantize(x: torch.Tensor) -> torch.Tensor:
        data, scale, zero = quantize_kv_ref(x, kv_bits)
        return dequantize_kv_ref(data, scale, zero, kv_bits, dtype=x.dtype)

    return quantize


def paged_prefill(q, k, v, cache: KVCacheLayer, block_tables, cu_seqlens, kv_lens, scale, max_seqlen,
                  has_context: bool = True, out=None) -> torch.Tensor:
    """Serving prefill (the engine's chunks, DenseKVCache's prompt): causal attention over the
    pages, which hold this chunk's K/V too. When no chunk has earlier context and a KV16 cache
    holds the fresh K/V exactly (same dtype), the flash kernel on the fresh K/V reads the same
    values without the page gather."""
    if not has_context and cache.bits == 16 and cache.k_cache.dtype == k.dtype:
        return prefill_attention(q, k, v, cu_seqlens, scale, max_seqlen, out=out)
    return paged_prefill_attention(q, cache, block_tables, cu_seqlens, kv_lens, scale, max_seqlen, out=out)


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
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k), self.kv_quantizer(v)
        return _sdpa(q, k, v, None, causal=True)


# What K/V the queries of a cached (generation) forward read; see DenseKVCache.
FAKE_QUANT = "fake_quant"
SERVING = "serving"
KV_MODES = (FAKE_QUANT, SERVING)


class DenseKVCache:
    """Per-sequence KV cache for a left-padded batch that advances in lock step (qoq.generate).

    Two explicit modes say which K/V a query reads when kv_bits is 4 or 8:

    - ``"fake_quant"`` (the default): every query, prompt tokens included, reads K/V as the
      quantized cache returns them, as CausalAttention does for perplexity. `kv_quantizer` (or
      `kv_bits`) maps a [B, T, Hkv, D] tensor to its dequantized value and the cache holds that.
    - ``"serving"``: the serving engine's semantics (qoq.engine, docs/serving.md). The first
      forward is the prefill: its tokens attend causally over the stored K/V of the prompt.
      Every token's K/V is stored quantized (KV4/KV8 codes + fp16 scale/zero; KV16 as the
      engine's pages hold it: fp16 on a GPU, the model's dtype on the CPU); each later token
      attends over the stored K/V, itself included. `qoq eval ppl` does not use this cache: its
      CausalAttention keeps the fake-quant semantics.

    The serving mode runs the engine's own attention ops on a cache in the kernels' layout, each
    sequence owning a contiguous run of `page_size` pages with its token at position p in slot p
    (left padding never enters the cache): `rope_kv_write` rotates q/k and quantizes K/V into
    the cache, `paged_prefill_attention` covers the prompt, `paged_decode_attention` the later tokens
    over whole pages, as the engine's batch does. So with the engine's page size, a batch that
    the engine runs in the same composition gets the same numbers (on the CPU reference twins
    bit for bit, which tests/engine checks).
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
        mode: str = FAKE_QUANT,
        page_size: int = 64,
        qk_hadamard: bool = False,
    ) -> None:
        if mode not in KV_MODES:
            raise ValueError(f"KV cache mode must be one of {', '.join(KV_MODES)}, got {mode!r}")
        if qk_hadamard:
            check_hadamard_dim(head_dim)
        self.mode = mode
        self.qk_hadamard = qk_hadamard
        self.max_len = max_len
        self.length = 0
        self.pad_lens = pad_lens if pad_lens is not None else torch.zeros(batch_size, dtype=torch.long)
        self.pad_lens = self.pad_lens.to(device)
        if mode == FAKE_QUANT:
            shape = (batch_size, max_len, num_kv_heads, head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.kv_quantizer = kv_quantizer if kv_quantizer is not None else kv_quantizer_for(kv_bits)
            return
        if kv_quantizer is not None:
            raise ValueError("a custom kv_quantizer needs mode 'fake_quant': the serving mode stores K/V "
                             "with the cache kernels' own KV4/KV8 quantization")
        kv_quantizer_for(kv_bits)  # validates kv_bits
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.pages_per_seq = -(-max_len // page_size)
        # As the engine's model runner: the Triton kernels keep KV16 in fp16, the CPU twins keep
        # the model's dtype.
        kv_dtype = torch.float16 if torch.device(device).type == "cuda" else dtype
        self.layers: list[KVCacheLayer] = allocate_kv_cache(
            num_layers, batch_size * self.pages_per_seq, num_kv_heads, head_dim, page_size, kv_bits, device, kv_dtype,
            qk_hadamard)
        self.scale = head_dim**-0.5  # the engine's PagedAttention scale

    def __call__(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        num_new = q.shape[1]
        end = self.length + num_new
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > capacity {self.max_len}")
        if self.mode == SERVING:
            return self._serving(layer_idx, q, k, v, positions, rotary)
        q, k = rope_qk(q, k, positions, rotary, self.qk_hadamard)
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k), self.kv_quantizer(v)
        self.k[layer_idx][:, self.length : end] = k
        self.v[layer_idx][:, self.length : end] = v
        key_pos = torch.arange(end, device=q.device)
        query_pos = torch.arange(self.length, end, device=q.device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None] & (key_pos[None, None, :] >= self.pad_lens[:, None, None])
        return _sdpa(q, self.k[layer_idx][:, :end], self.v[layer_idx][:, :end], mask[:, None], causal=False)

    def _serving(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        batch, num_new, num_heads, head_dim = q.shape
        device = q.device
        cache = self.layers[layer_idx]
        # Position of each new token in its own sequence; negative for left padding.
        seq_pos = torch.arange(self.length, self.length + num_new, device=device)[None] - self.pad_lens[:, None]
        first_slot = torch.arange(batch, device=device)[:, None] * (self.pages_per_seq * self.page_size)
        slots = torch.where(seq_pos >= 0, first_slot + seq_pos, -1).reshape(-1)

        def flat(x):
            return x.reshape(batch * num_new, x.shape[2], head_dim)

        v = flat(v)
        q, k = rope_kv_write(flat(q), flat(k), v, positions.reshape(-1), rotary.cos_sin_cache, slots, cache)
        if self.length == 0:  # the prompt: causal over its pages, each sequence packed without padding
            keep = slots >= 0
            lens = (num_new - self.pad_lens).to(torch.int32)
            cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
            width = -(-int(lens.max()) // self.page_size)
            tables = (first_slot // self.page_size + torch.arange(width, device=device)[None]).to(torch.int32)
            out = torch.zeros_like(q)
            out[keep] = paged_prefill(q[keep], k[keep], v[keep], cache, tables, cu_seqlens, lens, self.scale,
                                      int(lens.max()), has_context=False)
            return out.view(batch, num_new, num_heads, head_dim)
        # Later tokens: over the quantized cache, itself included, read in whole pages.
        context_lens = (seq_pos + 1).clamp(min=0).to(torch.int32)
        width = -(-int(context_lens.max()) // self.page_size)
        tables = (first_slot // self.page_size + torch.arange(width, device=device)[None]).to(torch.int32)
        q = q.view(batch, num_new, num_heads, head_dim)
        out = [paged_decode_attention(q[:, i].contiguous(), cache, tables, context_lens[:, i].contiguous(), self.scale)
               for i in range(num_new)]
        return torch.stack(out, 1)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
