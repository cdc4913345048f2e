"""How a scheduled batch runs: KV cache allocation, flattened inputs, forward, logits, sampling.

The model sees one row of T tokens (prefill chunks packed first, then one token per decode), so
one forward serves a mixed batch with no padding. Pure-decode batches replay a captured CUDA graph
on the GPU (cuda_graph.py); everything else runs eagerly.

Every step is launched: `launch` queues it on the device and returns a `StepInFlight` whose
tokens are read later (at once with synchronous scheduling; a step later with async scheduling,
docs/serving.md). A decode whose last token is still in flight (`Sequence.num_pending`)
takes it from the previous step's device tensor: the input ids are gathered on the device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qoq.engine.attention import AttentionMetadata, FlatAttention, FlatMetadata, PagedAttention
from qoq.engine.batch_invariant import PerRowLinears
from qoq.engine.block_manager import pages_needed
from qoq.engine.config import EngineConfig
from qoq.engine.cuda_graph import DecodeGraphs, FullPrefillGraphs, PrefillGraphs
from qoq.engine.logprobs import LogprobsInFlight, prompt_logprobs, sampled_logprobs
from qoq.engine.sampler import process_logits, sample_tokens_device
from qoq.engine.scheduler import ScheduledBatch
from qoq.engine.sequence import Sequence
from qoq.engine.transfer import DeviceToHost, to_device
from qoq.engine.warmup import dummy_prefill, scratch_cache, warm_up
from qoq.kernels import allocate_kv_cache
from qoq.kernels.paged_prefill_attention import prefill_work
from qoq.model.llama import LlamaModel
from qoq.model.tensor_parallel import local_config


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    metadata: AttentionMetadata
    logit_indices: torch.Tensor  # [num_seqs]: the token whose logits pick each sequence's next token
    # Prompt logprobs (chunks of sequences that ask): rows of the step's tokens, the prompt token
    # each row predicts, and per chunk (sequence, position of its first target, number of targets).
    prompt_rows: list[int] | None = None
    prompt_targets: list[int] | None = None
    prompt_chunks: list[tuple[Sequence, int, int]] | None = None


@dataclass
class StepInFlight:
    """A launched step: its sequences in row order, their sampled tokens on the device, and the
    copy of those to the host (started at launch; `token_ids` waits for it)."""

    batch: ScheduledBatch
    seqs: list[Sequence]
    tokens: torch.Tensor  # [len(seqs)] int64 on the device: the next step's pending input ids
    host: DeviceToHost
    logprobs: LogprobsInFlight | None = None  # of the sampled tokens, for the rows that ask
    prompt_logprobs: LogprobsInFlight | None = None  # rows: (seq, first target position) per chunk

    def token_ids(self) -> list[int]:
        return self.host.tolist()


def kv_bytes_per_page(model: LlamaModel, page_size: int, bits: int, dtype: torch.dtype) -> int:
    cfg = local_config(model)  # this rank's KV heads under tensor parallelism
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
        # an fp32 model's paged cache holds exactly what the no-cache reference attends over.
        self.kv_dtype = torch.float16 if self.device.type == "cuda" else model.dtype
        # Tensor parallel (docs/parallel.md#the-engine): each rank's cache holds its own KV heads, and
        # every rank takes the same page count, the smallest that fits, so the ranks' schedulers agree.
        self.tp = model.tp
        cuda = self.device.type == "cuda"
        if cuda and config.kernel_warmup and not config.deterministic:
            warm_up(model, config.max_num_batched_tokens, config.max_num_seqs, max_model_len, config.page_size,
                    kv_bits, self.kv_dtype)
        self.num_pages = config.num_pages or self._pages_that_fit()
        if self.tp is not None:
            self.num_pages = self.tp.min(self.num_pages, self.device)
        cfg = local_config(model)
        self.kv_cache = allocate_kv_cache(cfg.num_layers, self.num_pages, cfg.num_kv_heads, cfg.head_dim,
                                          config.page_size, kv_bits, self.device, self.kv_dtype,
                                          model.quant_config.qk_hadamard)
        self.attn = PagedAttention(self.kv_cache, cfg.head_dim)
        # prefill_graph_mode "full": steps with prompt tokens attend through one flat launch per layer
        self.flat = config.prefill_graph_mode == "full" and not config.deterministic
        self.flat_attn = FlatAttention(self.kv_cache, cfg.head_dim) if self.flat else None
        self.gqa_group = cfg.num_heads // cfg.num_kv_heads
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Steps with prompt tokens replay piecewise graphs, or whole ones in the "full" mode
        # (cuda_graph.py). They are captured after the cache is allocated, into the memory the
        # sizing kept for the largest eager step: the graphs' pool holds that step's activations,
        # so the reserve is counted once, not twice.
        self.prefill_graphs: PrefillGraphs | FullPrefillGraphs | None = None
        self.graphs: DecodeGraphs | None = None
        if cuda and not (config.enforce_eager or config.deterministic):
            kind = FullPrefillGraphs if self.flat else PrefillGraphs
            self.prefill_graphs = kind.capture(self, config.max_num_batched_tokens)
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
        max_len = min(self.max_pages_per_seq * self.config.page_size, self.model.config.max_position_embeddings)
        scratch = scratch_cache(self.model, self.config.page_size, self.kv_bits, self.kv_dtype)
        hidden = dummy_prefill(self.model, scratch, self.config.max_num_batched_tokens, max_len, self.config.page_size)
        self.model.compute_logits(hidden[0, : self.config.max_num_seqs])
        del scratch
        free, total = torch.cuda.mem_get_info(self.device)
        peak_extra = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        del hidden
        torch.cuda.empty_cache()
        return max(0, int(total * self.config.gpu_memory_utilization) - (total - free) - peak_extra)

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: StepInFlight | None) -> StepInFlight:
        """Queue one scheduled step on the device and return at once (nothing here waits for it).

        `prev` is the step still in flight: decodes whose last token it sampled read that token
        from its device tensor.
        """
        seqs = batch.seqs
        inputs = self.prepare(batch, prev.tokens if prev is not None else None)
        logits, prompt_lp = self._logits(batch, inputs)
        raw = logits
        extras = any(s.has_extras for s in seqs)  # the common case has none: sampling only
        if extras:
            logits = logits.clone()
            process_logits(logits, seqs, inputs.input_ids[0].index_select(0, inputs.logit_indices))
        tokens = self._share(sample_tokens_device(logits, seqs, self.generator))
        sampled_lp = sampled_logprobs(raw, tokens, seqs) if extras else None
        return StepInFlight(batch, seqs, tokens, DeviceToHost(tokens), sampled_lp, prompt_lp)

    def _share(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's tokens on every rank (queued on the stream, no sync). The ranks' logits are the
        same all-gathered values and their generators the same seeds, so this only makes sure of
        it: a token that differed would make the ranks' schedulers part ways."""
        return tokens if self.tp is None else self.tp.broadcast(tokens)

    def _logits(self, batch: ScheduledBatch, inputs: ModelInputs) -> tuple[torch.Tensor, LogprobsInFlight | None]:
        if self._decode_graph_fits(batch):
            hidden = self.graphs.replay(inputs)
            return self.model.compute_logits(hidden[inputs.logit_indices]), None
        if (self.prefill_graphs is not None and self.prefill_graphs.fits(inputs.input_ids.shape[1])
                and (not self.flat or inputs.metadata.flat is not None)):
            hidden = self.prefill_graphs.run(inputs, self.attn)[0]
            return self.model.compute_logits(hidden[inputs.logit_indices]), self._prompt_logprobs(hidden, inputs)
        with PerRowLinears() if self.config.deterministic else contextlib.nullcontext():
            attn = self.flat_attn if inputs.metadata.flat is not None else self.attn
            attn.metadata = inputs.metadata
            hidden = self.model(inputs.input_ids, inputs.positions, attn)[0]
            logits = self.model.compute_logits(hidden[inputs.logit_indices])
            return logits, self._prompt_logprobs(hidden, inputs)

    def _decode_graph_fits(self, batch: ScheduledBatch) -> bool:
        return self.graphs is not None and not batch.chunks and self.graphs.fits(len(batch.decodes))

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs) -> LogprobsInFlight | None:
        if not inputs.prompt_rows:
            return None
        ks = [seq.params.prompt_logprobs for seq, _, _ in inputs.prompt_chunks]
        dev = self.device
        values = prompt_logprobs(self.model, hidden, to_device(inputs.prompt_rows, torch.long, dev),
                                 to_device(inputs.prompt_targets, torch.long, dev), max(ks))
        return LogprobsInFlight([(seq, first) for seq, first, _ in inputs.prompt_chunks], ks, max(ks),
                                DeviceToHost(values), inputs.prompt_targets, [n for _, _, n in inputs.prompt_chunks])

    def prepare(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> ModelInputs:
        """Flattened inputs on the device. A decode whose last token is pending (sampled by the
        step in flight, not read back) gets its input id from `prev_tokens` on the device."""
        # Plain Python lists, one tensor per field: per-sequence tensors cost milliseconds a step
        # at batch sizes in the hundreds. Every copy to the device is queued without a sync.
        page_size = self.config.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        logit_indices: list[int] = []  # the last token of each chunk that samples, then every decode
        kv_lens: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_chunks: list[tuple[Sequence, int, int]] = []
        for chunk in batch.chunks:
            seq, start = chunk.seq, chunk.start
            assert not seq.num_pending, "a prefill needs all of its tokens known"
            end = start + chunk.num_tokens
            ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // page_size] * page_size + p % page_size for p in range(start, end))
            cu_seqlens.append(cu_seqlens[-1] + chunk.num_tokens)
            kv_lens.append(end)
            if chunk.samples:
                logit_indices.append(cu_seqlens[-1] - 1)
            if seq.wants_prompt_logprobs:  # row p predicts token p + 1 of the prompt
                num = min(end, seq.num_prompt_tokens - 1) - start
                if num > 0:
                    row0 = cu_seqlens[-2]
                    prompt_rows.extend(range(row0, row0 + num))
                    prompt_targets.extend(seq.prompt_token_ids[start + 1 : start + 1 + num])
                    prompt_chunks.append((seq, start + 1, num))
        context_lens: list[int] = []
        pending_rows: list[int] = []  # rows of `ids` whose token is on the device...
        pending_src: list[int] = []  # ...at these rows of prev_tokens
        for seq in batch.decodes:  # the hot loop at large batches: attribute lookups only
            out = seq.output_token_ids
            num = len(seq.prompt_token_ids) + len(out)
            if seq.num_pending:
                pending_rows.append(len(ids))
                pending_src.append(seq.pending_row)
                ids.append(0)  # overwritten on the device below
                num += 1
            else:
                ids.append(out[-1] if out else seq.prompt_token_ids[-1])
            positions.append(num - 1)
            context_lens.append(num)
            slots.append(seq.block_table[(num - 1) // page_size] * page_size + (num - 1) % page_size)
        num_prefill = cu_seqlens[-1]
        logit_indices.extend(range(num_prefill, len(ids)))
        dev = self.device
        md = AttentionMetadata(slot_mapping=to_device(slots, torch.long, dev), num_prefill_tokens=num_prefill)
        # Flat attention (prefill_graph_mode "full"): steps with prompt tokens, and decode batches
        # past the decode graphs that a whole prefill graph will run; it needs no other metadata.
        if self.flat and (batch.chunks or (self.prefill_graphs is not None and not self._decode_graph_fits(batch))):
            md.flat = self._flat_metadata(batch, cu_seqlens, kv_lens, context_lens, len(ids))
        elif batch.chunks:
            md.cu_seqlens = to_device(cu_seqlens, torch.int32, dev)
            md.max_seqlen = max(c.num_tokens for c in batch.chunks)
            md.prefill_kv_lens = to_device(kv_lens, torch.int32, dev)
            md.prefill_block_tables = to_device(self.block_tables([c.seq for c in batch.chunks]), torch.int32, dev)
            md.prefill_has_context = any(c.start for c in batch.chunks)
        if batch.decodes and md.flat is None:
            md.block_tables = to_device(self.block_tables(batch.decodes), torch.int32, dev)
            md.context_lens = to_device(context_lens, torch.int32, dev)
        if self.config.deterministic:  # every token attends alone (batch_invariant.py)
            token_seqs = [c.seq for c in batch.chunks for _ in range(c.num_tokens)] + batch.decodes
            md.token_block_tables = to_device(self.block_tables(token_seqs), torch.int32, dev)
            md.token_context_lens = to_device([p + 1 for p in positions], torch.int32, dev)
            md.token_num_pages = [pages_needed(p + 1, page_size) for p in positions]
        input_ids = to_device([ids], torch.long, dev)
        if pending_rows:
            assert prev_tokens is not None, "a pending token needs the step that sampled it"
            # Queued after that step's sampling on the same stream: no sync, the right values.
            src = prev_tokens.index_select(0, to_device(pending_src, torch.long, dev))
            input_ids[0].index_copy_(0, to_device(pending_rows, torch.long, dev), src)
        return ModelInputs(
            input_ids=input_ids,
            positions=to_device([positions], torch.long, dev),
            metadata=md,
            logit_indices=to_device(logit_indices, torch.long, dev),
            prompt_rows=prompt_rows or None,
            prompt_targets=prompt_targets or None,
            prompt_chunks=prompt_chunks or None,
        )

    def _flat_metadata(self, batch: ScheduledBatch, cu_prefill: list[int], kv_lens: list[int],
                       context_lens: list[int], num_tokens: int) -> FlatMetadata:
        """The step for FlatAttention: the chunks' work list, and the decodes' rows padded to the
        decode capacity of the graph that will run it (spare rows: distinct rows no decode holds,
        context 0)."""
        graphs = self.prefill_graphs
        size = graphs.size_for(num_tokens) if graphs is not None and graphs.fits(num_tokens) else None
        capacity = graphs.work_capacity(num_tokens) if size is not None else None
        dev = self.device
        work = prefill_work([c.num_tokens for c in batch.chunks], self.gqa_group, dev.type == "cuda", capacity)
        num_prefill, decodes = cu_prefill[-1], batch.decodes
        rows = list(range(num_prefill, num_prefill + len(decodes)))
        spare = graphs.decode_capacity(size) - len(decodes) if size is not None else 0
        on_prompt = min(spare, num_prefill)  # then padding rows: capacity <= size leaves enough
        rows += range(on_prompt)
        rows += range(num_tokens, num_tokens + spare - on_prompt)
        tables = self.block_tables(decodes) if decodes else torch.zeros(0, 1, dtype=torch.int32)
        chunk_tables = (self.block_tables([c.seq for c in batch.chunks]) if batch.chunks
                        else torch.zeros(0, 1, dtype=torch.int32))
        return FlatMetadata(cu_seqlens=to_device(cu_prefill, torch.int32, dev), kv_lens=to_device(kv_lens, torch.int32, dev),
                            block_tables=to_device(chunk_tables, torch.int32, dev), work=to_device(work, torch.int32, dev),
                            decode_rows=to_device(rows, torch.long, dev),
                            decode_context_lens=to_device(context_lens + [0] * spare, torch.int32, dev),
                            decode_block_tables=to_device(tables, torch.int32, dev))

    @staticmethod
    def block_tables(seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        flat: list[int] = []  # one flat list: torch.tensor of nested lists is ~3x slower
        pad = [0] * width
        for s in seqs:
            flat += s.block_table
            flat += pad[len(s.block_table):]
        return torch.tensor(flat, dtype=torch.int32).view(len(seqs), width)
