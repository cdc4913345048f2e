"""CUDA graphs for pure-decode steps: one graph per padded batch size, replayed with new inputs.

Decode steps are many small kernels (launch bound at small batches); a graph launches them all
at once. Captured graphs read from static buffers, so a step copies its inputs in, pads the
batch up to the next captured size (padding rows write nowhere, slot -1, and read one token of
page 0, always finite) and replays. Any failure at capture (a layer that syncs, an op not
capturable) leaves the engine decoding eagerly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from qoq.engine.attention import AttentionMetadata, FlatAttention, FlatMetadata
from qoq.kernels.paged_prefill_attention import prefill_work_capacity

if TYPE_CHECKING:
    from qoq.engine.model_runner import ModelInputs, ModelRunner

log = logging.getLogger(__name__)


def _captured(graphs, fallback: str):
    """`graphs` once its _capture_all() ran, None if it raised: any capture failure (a layer that
    syncs, an op not capturable) means running eagerly, which `fallback` says."""
    before = torch.cuda.memory_reserved()
    try:
        graphs._capture_all()
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("CUDA graph capture failed (%s: %s); %s", type(err).__name__, err, fallback)
        torch.cuda.synchronize()
        return None
    graphs.memory_bytes = torch.cuda.memory_reserved() - before
    log.info("%s: %d sizes captured (up to %d), %.2f GiB of device memory", type(graphs).__name__,
             len(graphs.sizes), graphs.sizes[-1], graphs.memory_bytes / 2**30)
    return graphs


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class _WholeGraphs:
    """Whole forwards, one graph per size, over static token ids, positions and slots (-1: padding
    rows write nowhere); subclasses add their attention's buffers and metadata."""

    def __init__(self, runner: ModelRunner, sizes: list[int]) -> None:
        self.runner = runner
        self.sizes = sizes
        dev, n = runner.device, sizes[-1]
        self.input_ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [size, hidden]

    def _attention(self, size: int):
        """The attention backend, its metadata set to the static buffers' views for `size`."""
        raise NotImplementedError

    @torch.inference_mode()
    def _capture_all(self) -> None:
        model, pool = self.runner.model, None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            args = (self.input_ids[:, :size], self.positions[:, :size], self._attention(size))
            model(*args)  # warm-up outside the capture: Triton compiles, allocator settles
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the KV cache holds all but the reserve: give the plain run's blocks back
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = model(*args)[0]
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, num_rows: int) -> bool:
        return num_rows <= self.sizes[-1]

    def size_for(self, num_rows: int) -> int:
        """The padded row count of the graph that runs a step of num_rows rows."""
        return next(s for s in self.sizes if s >= num_rows)


class DecodeGraphs(_WholeGraphs):
    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        super().__init__(runner, graph_batch_sizes(max_batch_size))
        dev, n = runner.device, max_batch_size
        self.block_tables = torch.zeros(n, runner.max_pages_per_seq, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)

    @classmethod
    def capture(cls, runner: ModelRunner, max_batch_size: int) -> DecodeGraphs | None:
        return _captured(cls(runner, max_batch_size), "decode runs eagerly")

    def _attention(self, size: int):
        attn = self.runner.attn
        attn.metadata = AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                                          context_lens=self.context_lens[:size])
        return attn

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        """Copy a step's inputs into the static buffers, replay, return a view of the static output.

        Async scheduling needs nothing more: everything here is queued on the one stream in order.
        `inputs.input_ids` already holds the pending tokens gathered on the device (prepare), so the
        copy below reads them after that gather; the next step's copies into the static buffers
        queue after this replay; and the static output returned here is consumed (logits,
        sampling) before the next replay overwrites it.
        """
        n = inputs.input_ids.shape[1]
        size = self.size_for(n)
        md = inputs.metadata
        self.input_ids[:, :n] = inputs.input_ids
        self.positions[:, :n] = inputs.positions
        self.slot_mapping.fill_(-1)
        self.slot_mapping[:n] = md.slot_mapping
        self.context_lens.fill_(1)
        self.context_lens[:n] = md.context_lens
        self.block_tables.zero_()
        self.block_tables[:n, : md.block_tables.shape[1]] = md.block_tables
        self.graphs[size].replay()
        return self.outputs[size][:n]


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts captured for steps with prompt tokens: fine steps where a step of a prompt
    chunk plus the running decodes lands (padding costs GEMM work), coarser above."""
    sizes = [16, 32, 64] + list(range(128, 2049, 128)) + list(range(2304, 4097, 256)) + list(range(4608, 16385, 512))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


class _Cut:
    """The attention backend while a forward is captured piecewise: each attention call ends the
    segment being captured (after copying q/k/v into the static buffers) and starts the next one,
    whose first op reads the static attention output. `pool` None: a plain run (warm-up)."""

    def __init__(self, owner: PrefillGraphs, n: int, pool) -> None:
        self.owner, self.n, self.pool = owner, n, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.segments: list[torch.cuda.CUDAGraph] = []

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)

    def end(self) -> None:
        self.graph.capture_end()
        self.segments.append(self.graph)
        self.graph = None

    def __call__(self, layer_idx, q, k, v, positions, rotary) -> torch.Tensor:
        o, n = self.owner, self.n
        if o.q is None:  # the first (plain, largest) run: buffers in the dtype attention gets
            size = o.sizes[-1]
            o.q = q.new_zeros(1, size, *q.shape[2:])
            o.k, o.v = k.new_zeros(1, size, *k.shape[2:]), v.new_zeros(1, size, *v.shape[2:])
            o.out = torch.zeros_like(o.q)
        o.q[:, :n].copy_(q)
        o.k[:, :n].copy_(k)
        o.v[:, :n].copy_(v)
        if self.pool is not None:
            self.end()
            self.begin()
        return o.out[:, :n]


class PrefillGraphs:
    """CUDA graphs for steps with prompt tokens, captured piecewise: one graph per stretch of the
    forward between two attention calls (embedding to layer 0's qkv, layer i's o_proj to layer
    i+1's qkv, the last o_proj to the final norm), for each padded token count. Attention runs
    eagerly between them on the step's real metadata, reading q/k/v from static buffers and
    writing a static output: its grid depends on the step's sequences, everything else only on
    the token count. Without this, the ~480 kernel launches of such a step cost ~50-70 ms of host
    time on an H100 (benchmarks/probe_host_overhead.py) against ~21 ms of device time for a
    1024-token prompt, and every running stream waited for it.

    Padding rows (the rows past the step's tokens) are left out of attention, whose static
    output keeps whatever they held; every other op works row by row, so they never touch the
    real rows. The graphs share one memory pool (replayed in the order captured, one step at a
    time) and are captured after the KV cache is allocated, into the reserve the sizing kept for
    one eager step of the whole token budget (whose activations the pool now holds).
    """

    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        self.runner = runner
        self.sizes = prefill_graph_sizes(max_tokens)
        dev, n = runner.device, self.sizes[-1]
        self.input_ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, n, dtype=torch.long, device=dev)
        # q, k, v (attention's input), out (its output), hidden (the forward's): made by the first
        # plain run, in the dtypes the model produces there
        self.q = self.k = self.v = self.out = self.hidden = None
        self.segments: dict[int, list[torch.cuda.CUDAGraph]] = {}

    @classmethod
    def capture(cls, runner: ModelRunner, max_tokens: int) -> PrefillGraphs | None:
        return _captured(cls(runner, max_tokens), "steps with prompt tokens run eagerly")

    @torch.inference_mode()
    def _capture_all(self) -> None:
        model = self.runner.model
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n in reversed(self.sizes):  # largest first: the pool's blocks fit the smaller ones
                args = (self.input_ids[:, :n], self.positions[:, :n])
                hidden = model(*args, _Cut(self, n, None))  # a plain run first: allocator and handles settle
                if self.hidden is None:
                    self.hidden = torch.zeros_like(hidden)
                del hidden
                torch.cuda.synchronize()
                # The plain run's blocks go back to the device before the pool takes its own: the
                # KV cache already holds all but the reserve for one eager step of the budget.
                torch.cuda.empty_cache()
                cut = _Cut(self, n, pool)
                cut.begin()
                try:
                    self.hidden[:, :n].copy_(model(*args, cut))
                    cut.end()
                except BaseException:
                    if cut.graph is not None:  # never leave the stream capturing
                        try:
                            cut.graph.capture_end()
                        except Exception:  # noqa: BLE001 - the capture is invalid anyway
                            pass
                    raise
                self.segments[n] = cut.segments
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def run(self, inputs: ModelInputs, attn) -> torch.Tensor:
        """The step's final hidden states [1, T, hidden] (a view of a static output): segments
        replayed in order, the real attention between them."""
        n = inputs.input_ids.shape[1]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:, :n] = inputs.input_ids  # padding rows keep earlier (valid) ids
        self.positions[:, :n] = inputs.positions
        attn.metadata = inputs.metadata
        segments, rotary = self.segments[size], self.runner.model.rotary
        positions = self.positions[:, :n]
        for layer_idx, segment in enumerate(segments[:-1]):
            segment.replay()
            attn(layer_idx, self.q[:, :n], self.k[:, :n], self.v[:, :n], positions, rotary, out=self.out[:, :n])
        segments[-1].replay()
        return self.hidden[:, :n]


class FullPrefillGraphs(_WholeGraphs):
    """CUDA graphs for steps with prompt tokens, whole (prefill_graph_mode "full"): one graph per
    padded token count holds the forward with its attention (engine.attention.FlatAttention: the
    K/V write, a decode launch over the graph's decode capacity and a paged-prefill launch whose
    grid is the work list's capacity), so a step is its buffers' copies and one replay.

    Static buffers: token ids, positions, slots (-1 past the step's tokens: padding rows write
    nowhere); per chunk cu_seqlens (its tail set to the chunks' total: sequences of no tokens),
    cache lengths, page tables, and the work list, whose unused programs return at once; per
    decode row its row, context length (0 for a spare) and page table (a spare's is never read). Padding rows are in no
    chunk, and a spare decode row's output lands on a padding row or on a prompt row the prefill
    launch rewrites; every other op works row by row. Captured after the KV cache is allocated (the graphs hold its pointers), into the reserve
    kept for one eager step of the whole budget.
    """

    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        super().__init__(runner, prefill_graph_sizes(max_tokens))
        dev, n = runner.device, self.sizes[-1]
        self.max_seqs = min(n, runner.config.max_num_seqs)
        self.cu_seqlens = torch.zeros(self.max_seqs + 1, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(self.max_seqs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_seqs, runner.max_pages_per_seq, dtype=torch.int32, device=dev)
        self.work = torch.full((self.work_capacity(n), 2), -1, dtype=torch.int32, device=dev)
        self.decode_rows = torch.arange(self.max_seqs, dtype=torch.long, device=dev)  # distinct rows, context 0
        self.decode_context_lens = torch.zeros(self.max_seqs, dtype=torch.int32, device=dev)
        self.decode_block_tables = torch.zeros(self.max_seqs, runner.max_pages_per_seq, dtype=torch.int32, device=dev)
        self.attn = FlatAttention(runner.kv_cache, runner.model.config.head_dim)

    @classmethod
    def capture(cls, runner: ModelRunner, max_tokens: int) -> FullPrefillGraphs | None:
        return _captured(cls(runner, max_tokens), "steps with prompt tokens run eagerly")

    def work_capacity(self, num_tokens: int) -> int:
        """Programs in the work list of the graph that runs a step of num_tokens tokens."""
        size = self.size_for(num_tokens)
        return prefill_work_capacity(size, self.decode_capacity(size), self.runner.gqa_group, True)

    def decode_capacity(self, size: int) -> int:
        """Rows of the decode launch in the graph of this size: the most decodes a step can hold."""
        return min(size, self.runner.config.max_num_seqs)

    def _attention(self, size: int):
        d = self.decode_capacity(size)
        flat = FlatMetadata(cu_seqlens=self.cu_seqlens, kv_lens=self.kv_lens, block_tables=self.block_tables,
                            work=self.work[: self.work_capacity(size)], decode_rows=self.decode_rows[:d],
                            decode_context_lens=self.decode_context_lens[:d],
                            decode_block_tables=self.decode_block_tables[:d])
        self.attn.metadata = AttentionMetadata(slot_mapping=self.slot_mapping[:size], flat=flat)
        return self.attn

    def run(self, inputs: ModelInputs, attn=None) -> torch.Tensor:
        """The step's final hidden states [1, T, hidden] (a view of a static output). Everything is
        queued on the one stream, as DecodeGraphs.replay says for async scheduling."""
        n = inputs.input_ids.shape[1]
        size = self.size_for(n)
        md, flat = inputs.metadata, inputs.metadata.flat
        assert flat is not None and flat.work.shape[0] == self.work_capacity(n), "prepare sizes the work list"
        d = flat.decode_rows.shape[0]
        assert d == self.decode_capacity(size), "prepare pads the decode rows to the graph's capacity"
        self.input_ids[:, :n] = inputs.input_ids  # padding rows keep earlier (valid) ids
        self.positions[:, :n] = inputs.positions
        self.slot_mapping[:n] = md.slot_mapping
        self.slot_mapping[n:size] = -1
        seqs = flat.kv_lens.shape[0]
        self.cu_seqlens[: seqs + 1] = flat.cu_seqlens
        self.cu_seqlens[seqs + 1 :] = md.num_prefill_tokens
        self.kv_lens[:seqs] = flat.kv_lens
        self.block_tables[:seqs, : flat.block_tables.shape[1]] = flat.block_tables
        self.work[: flat.work.shape[0]] = flat.work
        self.decode_rows[:d] = flat.decode_rows
        self.decode_context_lens[:d] = flat.decode_context_lens
        tables = flat.decode_block_tables  # the decodes' rows: a spare row's stale table is never read
        self.decode_block_tables[: tables.shape[0], : tables.shape[1]] = tables
        self.graphs[size].replay()
        return self.outputs[size][None, :n]
