"""The paged attention backend: the model calls it per layer with un-rotated q/k and fresh v.

One forward pass carries a flattened batch, [1, T] tokens: the prefill sequences' tokens first
(packed, cu_seqlens marks each), then one token per decoding sequence. Per layer, one fused
kernel rotates q/k and writes quantized K/V into the pages for every token; prefill tokens then
attend causally over their own fresh full-precision K/V (SPEC section 3), decode tokens over the
(quantized) pages, which by now include the token itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.kernels import KVCacheLayer, paged_decode_attention, prefill_attention, rope_kv_write


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token (-1: write nothing)
    num_prefill_tokens: int = 0
    cu_seqlens: torch.Tensor | None = None  # [num_prefills + 1] int32
    max_seqlen: int = 0
    block_tables: torch.Tensor | None = None  # [num_decodes, max_pages] int32
    context_lens: torch.Tensor | None = None  # [num_decodes] int32, the new token included


class PagedAttention:
    def __init__(self, kv_cache: list[KVCacheLayer], head_dim: int) -> None:
        self.kv_cache = kv_cache
        self.scale = head_dim**-0.5
        self.metadata: AttentionMetadata | None = None  # set by the model runner before each forward

    def __call__(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        md = self.metadata
        assert md is not None, "the model runner sets the metadata before the forward"
        batch, num_tokens, num_heads, head_dim = q.shape
        q, k, v = (x.reshape(batch * num_tokens, x.shape[2], head_dim) for x in (q, k, v))
        cache = self.kv_cache[layer_idx]
        q, k = rope_kv_write(q, k, v, positions.reshape(-1), rotary.cos_sin_cache, md.slot_mapping, cache)
        num_prefill = md.num_prefill_tokens
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # both kernels write their rows in place
        if num_prefill:
            prefill_attention(q[:num_prefill], k[:num_prefill], v[:num_prefill], md.cu_seqlens, self.scale,
                              md.max_seqlen, out=out[:num_prefill])
        if num_prefill < q.shape[0]:
            paged_decode_attention(q[num_prefill:], cache, md.block_tables, md.context_lens, self.scale,
                                   out=out[num_prefill:])
        return out.view(batch, num_tokens, num_heads, head_dim)
