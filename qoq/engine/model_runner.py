"""How a scheduled batch runs: KV cache allocation, flattened inputs, forward, logits, sampling.

The model sees one row of T tokens (prefills packed first, then one token per decode), so one
forward serves a mixed batch with no padding. Pure-decode batches replay a captured CUDA graph
on the GPU (cuda_graph.py); everything else runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.engine.attention import AttentionMetadata, PagedAttention
from qoq.engine.block_manager import pages_needed
from qoq.engine.config import EngineConfig
from qoq.engine.cuda_graph import DecodeGraphs
from qoq.engine.sampler import sample_tokens
from qoq.engine.scheduler import ScheduledBatch
from qoq.engine.sequence import Sequence
from qoq.kernels import allocate_kv_cache
from qoq.model.llama import LlamaModel


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    metadata: AttentionMetadata
    logit_indices: torch.Tensor  # [num_seqs]: the token whose logits pick each sequence's next token


def kv_bytes_per_page(model: LlamaModel, page_size: int, bits: int, dtype: torch.dtype) -> int:
    cfg = model.config
    per_token_head = cfg.head_dim * bits // 8 if bits < 16 else cfg.head_dim * dtype.itemsize
    if bits < 16:
        per_token_head += 2 * 2  # fp16 scale and zero
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * per_token_head  # 2: K and V


class ModelRunner:
    def __init__(self, model: LlamaModel, config: EngineConfig, max_model_len: int, kv_bits: int) -> None:
        self.model = model
        self.config = config
        self.device = model.device
        self.kv_bits = kv_bits
        self.max_pages_per_seq = pages_needed(max_model_len, config.page_size)
        # The Triton kernels keep KV16 pages in fp16; the CPU reference keeps the model's dtype so
        # an fp32 model's paged cache holds exactly what the dense generator's cache holds.
        self.kv_dtype = torch.float16 if self.device.type == "cuda" else model.dtype
        self.num_pages = config.num_pages or self._pages_that_fit()
        cfg = model.config
        self.kv_cache = allocate_kv_cache(cfg.num_layers, self.num_pages, cfg.num_kv_heads, cfg.head_dim,
                                          config.page_size, kv_bits, self.device, self.kv_dtype)
        self.attn = PagedAttention(self.kv_cache, cfg.head_dim)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs.capture(self, min(config.max_graph_batch_size, config.max_num_seqs))

    # -- cache sizing ----------------------------------------------------------------------
    def _pages_that_fit(self) -> int:
        per_page = kv_bytes_per_page(self.model, self.config.page_size, self.kv_bits, self.kv_dtype)
        if self.device.type == "cuda":
            budget = self._free_gpu_bytes()
        else:
            budget = int(self.config.cpu_kv_cache_gib * 2**30)
        # More pages than every sequence at full length can use is waste (matters on the CPU).
        useful = self.config.max_num_seqs * self.max_pages_per_seq
        num_pages = min(budget // per_page, useful)
        if num_pages < self.max_pages_per_seq:
            raise ValueError(
                f"the KV cache fits only {num_pages} pages of {self.config.page_size} tokens, fewer than one "
                f"sequence of max_model_len needs ({self.max_pages_per_seq}): lower max_model_len, use "
                f"kv_bits 4, or give the cache more memory"
            )
        return int(num_pages)

    @torch.inference_mode()
    def _free_gpu_bytes(self) -> int:
        """Memory left for pages after the largest step the engine will run (its activations' peak).

        The probe is a real packed prefill of a full token budget through the paged backend (rows
        of at most max_model_len tokens, as whole sequences arrive), on a one-page cache that it
        never writes (slot -1): the dense eval attention would materialize score matrices no
        serving step allocates and starve the KV cache of tens of GB.
        """
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.max_num_batched_tokens
        max_len = min(self.max_pages_per_seq * self.config.page_size, self.model.config.max_position_embeddings)
        rows, row_len = max(1, num_tokens // max_len), min(num_tokens, max_len)
        cfg = self.model.config
        scratch = allocate_kv_cache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, self.config.page_size,
                                    self.kv_bits, self.device, self.kv_dtype)
        attn = PagedAttention(scratch, cfg.head_dim)
        attn.metadata = AttentionMetadata(
            slot_mapping=torch.full((rows * row_len,), -1, dtype=torch.long, device=self.device),
            num_prefill_tokens=rows * row_len,
            cu_seqlens=torch.arange(0, rows * row_len + 1, row_len, dtype=torch.int32, device=self.device),
            max_seqlen=row_len)
        ids = torch.zeros(1, rows * row_len, dtype=torch.long, device=self.device)
        positions = torch.arange(row_len, device=self.device).repeat(rows)[None]
        hidden = self.model(ids, positions, attn)
        self.model.compute_logits(hidden[0, : self.config.max_num_seqs])
        del scratch, attn
        free, total = torch.cuda.mem_get_info(self.device)
        peak_extra = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        del hidden
        torch.cuda.empty_cache()
        return max(0, int(total * self.config.gpu_memory_utilization) - (total - free) - peak_extra)

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int]:
        """Run one scheduled step and return the next token of each of batch.seqs."""
        inputs = self.prepare(batch)
        if self.graphs is not None and not batch.prefills and self.graphs.fits(len(batch.decodes)):
            hidden = self.graphs.replay(inputs)
        else:
            self.attn.metadata = inputs.metadata
            hidden = self.model(inputs.input_ids, inputs.positions, self.attn)[0]
        logits = self.model.compute_logits(hidden[inputs.logit_indices])
        return sample_tokens(logits, batch.seqs, self.generator)

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        # Plain Python lists, one tensor per field: per-sequence tensors cost milliseconds a step
        # at batch sizes in the hundreds.
        page_size = self.config.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        for seq in batch.prefills:
            ids.extend(seq.all_token_ids)
            positions.extend(range(seq.num_tokens))
            table = seq.block_table
            slots.extend(table[p // page_size] * page_size + p % page_size for p in range(seq.num_tokens))
            cu_seqlens.append(cu_seqlens[-1] + seq.num_tokens)
        context_lens: list[int] = []
        for seq in batch.decodes:  # the hot loop at large batches: attribute lookups only
            out = seq.output_token_ids
            num = len(seq.prompt_token_ids) + len(out)
            ids.append(out[-1] if out else seq.prompt_token_ids[-1])
            positions.append(num - 1)
            context_lens.append(num)
            slots.append(seq.block_table[(num - 1) // page_size] * page_size + (num - 1) % page_size)
        num_prefill = cu_seqlens[-1]
        logit_indices = [end - 1 for end in cu_seqlens[1:]] + list(range(num_prefill, len(ids)))
        dev = self.device
        md = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                               num_prefill_tokens=num_prefill)
        if batch.prefills:
            md.cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int32, device=dev)
            md.max_seqlen = max(s.num_tokens for s in batch.prefills)
        if batch.decodes:
            md.block_tables = self.block_tables(batch.decodes).to(dev)
            md.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
        return ModelInputs(
            input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
            positions=torch.tensor([positions], dtype=torch.long, device=dev),
            metadata=md,
            logit_indices=torch.tensor(logit_indices, dtype=torch.long, device=dev),
        )

    @staticmethod
    def block_tables(seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        flat: list[int] = []  # one flat list: torch.tensor of nested lists is ~3x slower
        pad = [0] * width
        for s in seqs:
            flat += s.block_table
            flat += pad[len(s.block_table):]
        return torch.tensor(flat, dtype=torch.int32).view(len(seqs), width)
