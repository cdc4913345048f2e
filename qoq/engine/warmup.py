"""Dummy steps on a scratch cache: the KV-cache sizing probe and the kernel warm-up.

Triton compiles a kernel the first time a process meets a new variant of it: a GEMM plan (tiles,
split-K, stream-K, where W4 is unpacked), chosen by the step's token count; an integer argument
that is or is not a multiple of 16; a decode attention with or without splits. In a server that
happens mid-run, between two tokens of every running stream, for up to seconds per variant, the
first time each size of mixed step (decodes plus prompt chunks) comes along. So on the GPU the
engine meets every variant once at start (`warm_up`): one dummy forward for each class of token
count up to its budget (the classes are what the linears' plans and the multiple-of-16 rule tell
apart), and the attention kernels over the batch sizes and table widths a step can have. CUDA
graph capture then covers pure-decode steps as before. Triton's on-disk cache makes later starts
of the same model quick.

Every dummy step reads a one-page scratch cache and writes nothing (slot -1), so the real cache
is never touched.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from qoq.engine.attention import AttentionMetadata, PagedAttention, appends, decode_append_min
from qoq.engine.block_manager import pages_needed
from qoq.kernels import KVAppend, KVCacheLayer, allocate_kv_cache, paged_decode_attention, paged_prefill_attention
from qoq.kernels.kv_cache import ROPE_PREFILL_TOKENS
from qoq.kernels.paged_prefill_attention import prefill_work
from qoq.model.llama import LlamaModel
from qoq.model.tensor_parallel import local_config

log = logging.getLogger(__name__)


def scratch_cache(model: LlamaModel, page_size: int, kv_bits: int, dtype: torch.dtype) -> list[KVCacheLayer]:
    """A one-page cache per layer, shaped like the engine's (this rank's KV heads)."""
    cfg = local_config(model)
    return allocate_kv_cache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, page_size, kv_bits, model.device,
                             dtype, model.quant_config.qk_hadamard)


def dummy_prefill(model: LlamaModel, scratch: list[KVCacheLayer], num_tokens: int, max_len: int,
                  page_size: int) -> torch.Tensor:
    """The hidden states [1, T, H] of a packed prefill of `num_tokens` token-0 prompts, each at
    most `max_len` long (whole rows first, then the rest), through the paged backend on `scratch`."""
    row_len = min(num_tokens, max_len)
    lens = [row_len] * (num_tokens // row_len) + ([num_tokens % row_len] if num_tokens % row_len else [])
    device = model.device
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    attn = PagedAttention(scratch, local_config(model).head_dim)
    attn.metadata = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=device),
        num_prefill_tokens=num_tokens, cu_seqlens=cu, max_seqlen=row_len,
        prefill_block_tables=torch.zeros(len(lens), pages_needed(row_len, page_size), dtype=torch.int32,
                                         device=device),
        prefill_kv_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        prefill_has_context=False)
    ids = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])[None]
    return model(ids, positions, attn)


def step_sizes(model: LlamaModel, max_tokens: int) -> list[int]:
    """The smallest token count of each class in 1..max_tokens: counts in one class run the same
    kernel variants (the same plan for every quantized linear's GEMM, the same RoPE tiles, and the
    same answer to "a multiple of 16?" and "one?", on which Triton specializes integer arguments)."""
    linears = {}
    for module in model.modules():
        if getattr(module, "gemm_mode", None) is not None and hasattr(module, "gemm_plan"):
            linears.setdefault((module.out_features, module.padded_in, module.gemm_mode), module)
    first: dict[tuple, int] = {}
    for m in range(1, max_tokens + 1):
        key = (tuple(layer.gemm_plan(m) for layer in linears.values()), m >= ROPE_PREFILL_TOKENS, m % 16 == 0, m == 1)
        first.setdefault(key, m)
    return sorted(first.values())


def _attention_shapes(max_num_seqs: int, max_pages: int) -> list[tuple[int, int]]:
    """(batch, table width) pairs covering the decode attention's variants: batches by powers of
    two up to the limit, widths of one page, a few pages, 16 (a multiple of 16) and the longest."""
    batches = sorted({min(1 << i, max_num_seqs) for i in range(max_num_seqs.bit_length() + 1)})
    widths = sorted({w for w in (1, 2, 15, 16, 17, max_pages - 1, max_pages) if 1 <= w <= max_pages})
    return [(b, w) for b in batches for w in widths]


@torch.inference_mode()
def warm_up(model: LlamaModel, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
            page_size: int, kv_bits: int, kv_dtype: torch.dtype) -> None:
    """Compile every kernel variant a step can need (module docstring). Tensor parallel: every
    rank runs the same dummy forwards, whose all-reduces pair up."""
    t0 = time.perf_counter()
    scratch = scratch_cache(model, page_size, kv_bits, kv_dtype)
    cfg = local_config(model)
    max_pages = pages_needed(max_model_len, page_size)
    sizes = step_sizes(model, max_num_batched_tokens)
    shapes = _attention_shapes(max_num_seqs, max_pages)
    append_min = decode_append_min()
    bar = tqdm(total=len(sizes) + len(shapes), desc="compiling kernels", unit="variant", leave=False,
               mininterval=2.0)
    for m in sizes:
        hidden = dummy_prefill(model, scratch, m, max_model_len, page_size)
        model.compute_logits(hidden[0, -min(m, max_num_seqs):])
        bar.update()
    layer = scratch[0]
    scale = cfg.head_dim**-0.5
    for batch, width in shapes:
        q = torch.zeros(batch, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=model.device)
        tables = torch.zeros(batch, width, dtype=torch.int32, device=model.device)
        lens = torch.full((batch,), width * page_size, dtype=torch.int32, device=model.device)
        paged_decode_attention(q, layer, tables, lens, scale)
        if appends(append_min, batch):  # decodes alone: the launch that writes the new K/V too (slot -1: nowhere)
            kv = torch.zeros(batch, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype, device=model.device)
            none = torch.full((batch,), -1, dtype=torch.long, device=model.device)
            paged_decode_attention(q, layer, tables, lens, scale,
                                   append=KVAppend(kv, kv, none + 1, model.rotary.cos_sin_cache, none))
        if batch <= 2:  # prefill chunks over cached pages: the same table widths, with a work list too
            cu = torch.tensor([0, batch], dtype=torch.int32, device=model.device)
            paged_prefill_attention(q, layer, tables[:1], cu, lens[:1], scale, max_seqlen=batch)
            work = prefill_work([batch], cfg.num_heads // cfg.num_kv_heads, model.device.type == "cuda")
            paged_prefill_attention(q, layer, tables[:1], cu, lens[:1], scale, max_seqlen=batch,
                                    work=work.to(model.device))
        bar.update()
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    bar.close()
    log.info("compiled the kernels for %d step sizes and %d attention shapes in %.1f s", len(sizes), len(shapes),
             time.perf_counter() - t0)
