"""The paged attention backend: the model calls it per layer with un-rotated q/k and fresh v.

One forward pass carries a flattened batch, [1, T] tokens: the prefill chunks' tokens first
(packed, cu_seqlens marks each), then one token per decoding sequence. Per layer, one fused
kernel rotates q/k and writes quantized K/V into the pages for every token; then every token
attends over the pages, which by now hold it: prefill chunks causally over their sequence's
pages (paged_prefill: earlier chunks and cached prefixes included), decode
tokens over their whole context (paged_decode_attention). A step of at least APPEND_MIN_DECODES
decodes alone is one launch per layer: decode attention rotates q and writes each sequence's new
K/V itself (`KVAppend`; the program that reads the last page writes it first).
QOQ_DECODE_APPEND=N sets the fewest decodes (1: every step of decodes alone, 0: never).

On an H100 that step is faster at batch 64 and 128 (4.460 / 5.138 ms against 4.578 / 5.294;
4.430 against 4.577 in a second run) but slower at 16 (3.297 against 3.159) and 1 (2.795
against 2.673): benchmarks/results/decode-append-ab-h100.json, decode-b64-ab-h100.json and
decode-b1-ab-h100.json. Every program rotates its q (RoPE and the q/k Hadamard) before its
first score, and the one holding the last token also writes, fences and waits: on a small,
latency-bound step that critical path costs more than the launch saved; at a large batch the
saved launch's work, spread over the attention's programs, pays. `qoq serve` on an H100 gave
16,826 output tokens/s against 15,880 to 128 HTTP clients (serve-append-h100.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qoq.kernels import (
    KVAppend,
    KVCacheLayer,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention,
    rope_kv_write,
)


def paged_prefill(q, k, v, cache: KVCacheLayer, block_tables, cu_seqlens, kv_lens, scale, max_seqlen,
                  has_context: bool = True, out=None) -> torch.Tensor:
    """Prefill chunks: causal attention over the pages, which hold this chunk's K/V too. When no
    chunk has earlier context and a KV16 cache holds the fresh K/V exactly (same dtype), the flash
    kernel on the fresh K/V reads the same values without the page gather."""
    if not has_context and cache.bits == 16 and cache.k_cache.dtype == k.dtype:
        return prefill_attention(q, k, v, cu_seqlens, scale, max_seqlen, out=out)
    return paged_prefill_attention(q, cache, block_tables, cu_seqlens, kv_lens, scale, max_seqlen, out=out)


@dataclass
class FlatMetadata:
    """A step with prompt tokens as launches whose grids depend on the token count only
    (FlatAttention): the prompt chunks through a paged-prefill work list, the decodes through one
    decode launch over a fixed number of rows."""

    cu_seqlens: torch.Tensor  # [C + 1] int32 over the chunks (a CUDA graph's buffer: longer, its tail = the total)
    kv_lens: torch.Tensor  # [C] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [C, max_pages] int32
    work: torch.Tensor  # [capacity, 2] int32: the kernel's (sequence, query block) list (prefill_work)
    # The decodes' rows of q, then (in a graph, up to its decode capacity) distinct rows no decode
    # holds, with context 0: prompt rows, which the prefill launch rewrites after, or padding.
    decode_rows: torch.Tensor  # [D] int64
    decode_context_lens: torch.Tensor  # [D] int32, the new token included (0: a spare row)
    decode_block_tables: torch.Tensor  # [decodes, max_pages] int32 (a graph's buffer: D rows, spares never read)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token (-1: write nothing)
    num_prefill_tokens: int = 0
    cu_seqlens: torch.Tensor | None = None  # [num_prefills + 1] int32
    max_seqlen: int = 0
    block_tables: torch.Tensor | None = None  # [num_decodes, max_pages] int32
    context_lens: torch.Tensor | None = None  # [num_decodes] int32, the new token included
    prefill_block_tables: torch.Tensor | None = None  # [num_prefills, max_pages] int32
    prefill_kv_lens: torch.Tensor | None = None  # [num_prefills] int32: cached tokens after the chunk
    prefill_has_context: bool = True  # some chunk starts past position 0 (reads earlier pages)
    # Deterministic mode: every token (prefill ones too) attends alone over its causal context.
    token_block_tables: torch.Tensor | None = None  # [T, max_pages] int32: the table of its sequence
    token_context_lens: torch.Tensor | None = None  # [T] int32: its position + 1
    token_num_pages: list[int] | None = None  # pages of that context, on the host
    flat: FlatMetadata | None = None  # steps with prompt tokens under prefill_graph_mode "full"


# The fewest decodes of a step that takes the one-launch path by default (module docstring).
APPEND_MIN_DECODES = 64


def decode_append_min() -> int | None:
    """The fewest decodes of a step of decodes alone that takes the one-launch path (`KVAppend`),
    None: never (QOQ_DECODE_APPEND=N, 0: never; unset: APPEND_MIN_DECODES)."""
    value = os.environ.get("QOQ_DECODE_APPEND", "").strip()
    if not value:
        return APPEND_MIN_DECODES
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"QOQ_DECODE_APPEND={value!r}: expected the fewest decodes of a step that writes its "
                         f"K/V in decode attention (0: never, 1: every step of decodes alone; unset: "
                         f"{APPEND_MIN_DECODES})")
    return n or None


def appends(append_min: int | None, decodes: int) -> bool:
    """Whether a step of `decodes` decodes alone takes the one-launch path under `append_min`."""
    return append_min is not None and decodes >= append_min  # append_min >= 1: an empty step never


class PagedAttention:
    def __init__(self, kv_cache: list[KVCacheLayer], head_dim: int) -> None:
        self.kv_cache = kv_cache
        self.scale = head_dim**-0.5
        self.metadata: AttentionMetadata | None = None  # set by the model runner before each forward
        self.append_min = decode_append_min()  # read once: the engine's setting, not a per-layer lookup

    def __call__(self, layer_idx, q, k, v, positions, rotary, out: torch.Tensor | None = None) -> torch.Tensor:
        """-> attention output shaped as q; `out`: write it there (contiguous, q's shape)."""
        md = self.metadata
        assert md is not None, "the model runner sets the metadata before the forward"
        batch, num_tokens, num_heads, head_dim = q.shape
        if md.num_prefill_tokens == 0 and md.token_num_pages is None and appends(self.append_min, batch * num_tokens):
            q, k, v = (x.reshape(-1, x.shape[2], head_dim) for x in (q, k, v))
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out.view(q.shape)
            paged_decode_attention(q, self.kv_cache[layer_idx], md.block_tables, md.context_lens, self.scale, out=out,
                                   append=KVAppend(k, v, positions.reshape(-1), rotary.cos_sin_cache, md.slot_mapping))
            return out.view(batch, num_tokens, num_heads, head_dim)
        q, k, v, cache = self._write(layer_idx, q, k, v, positions, rotary)
        num_prefill = md.num_prefill_tokens
        # both kernels write their rows in place
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out.view(q.shape)
        if md.token_num_pages is not None:
            self._per_token(q, cache, md, out)
        elif num_prefill:
            n = num_prefill
            paged_prefill(q[:n], k[:n], v[:n], cache, md.prefill_block_tables, md.cu_seqlens, md.prefill_kv_lens,
                          self.scale, md.max_seqlen, md.prefill_has_context, out=out[:n])
        if md.token_num_pages is None and num_prefill < q.shape[0]:
            paged_decode_attention(q[num_prefill:], cache, md.block_tables, md.context_lens, self.scale,
                                   out=out[num_prefill:])
        return out.view(batch, num_tokens, num_heads, head_dim)

    def _write(self, layer_idx, q, k, v, positions, rotary):
        """Rows flattened to [T, heads, head_dim], q and k rotated, K/V written to the pages at the
        metadata's slots: (q, k, v, the layer's cache)."""
        head_dim = q.shape[-1]
        q, k, v = (x.reshape(-1, x.shape[2], head_dim) for x in (q, k, v))
        cache = self.kv_cache[layer_idx]
        q, k = rope_kv_write(q, k, v, positions.reshape(-1), rotary.cos_sin_cache, self.metadata.slot_mapping, cache)
        return q, k, v, cache

    def _per_token(self, q, cache: KVCacheLayer, md: AttentionMetadata, out: torch.Tensor) -> None:
        """Each token as a decode of batch 1 over exactly its context's pages: the kernel and
        its reduction order depend on the token's own position only (batch_invariant.py)."""
        for i, num_pages in enumerate(md.token_num_pages):
            paged_decode_attention(q[i : i + 1], cache, md.token_block_tables[i : i + 1, :num_pages],
                                   md.token_context_lens[i : i + 1], self.scale, out=out[i : i + 1])


class FlatAttention(PagedAttention):
    """Steps with prompt tokens with a fixed set of launches per layer after the K/V write (`metadata.flat`):
    the decode rows gathered into one decode launch of a fixed row count and scattered back, then
    one paged-prefill launch over the chunks' work list. Every grid depends on the token count
    only, so a CUDA graph holds the whole step (cuda_graph.FullPrefillGraphs); the numbers are the
    piecewise step's kernels'."""

    def __call__(self, layer_idx, q, k, v, positions, rotary, out: torch.Tensor | None = None) -> torch.Tensor:
        md = self.metadata
        assert md is not None and md.flat is not None, "the model runner sets flat metadata before the forward"
        batch, num_tokens, num_heads, head_dim = q.shape
        q, _, _, cache = self._write(layer_idx, q, k, v, positions, rotary)
        flat = md.flat
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out.view(q.shape)
        if flat.decode_rows.shape[0]:  # first: spare rows may land on prompt rows, rewritten below
            rows = paged_decode_attention(q.index_select(0, flat.decode_rows), cache, flat.decode_block_tables,
                                          flat.decode_context_lens, self.scale)
            out.index_copy_(0, flat.decode_rows, rows)
        if flat.kv_lens.shape[0]:
            paged_prefill_attention(q, cache, flat.block_tables, flat.cu_seqlens, flat.kv_lens, self.scale,
                                    out=out, work=flat.work)
        return out.view(batch, num_tokens, num_heads, head_dim)
