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

from qoq.engine.attention import AttentionMetadata

if TYPE_CHECKING:
    from qoq.engine.model_runner import ModelInputs, ModelRunner

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch_size)
        dev, n = runner.device, max_batch_size
        self.input_ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, runner.max_pages_per_seq, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @classmethod
    def capture(cls, runner: ModelRunner, max_batch_size: int) -> DecodeGraphs | None:
        graphs = cls(runner, max_batch_size)
        try:
            graphs._capture_all()
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(err).__name__, err)
            torch.cuda.synchronize()
            return None
        return graphs

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            block_tables=self.block_tables[:batch_size],
            context_lens=self.context_lens[:batch_size],
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        model, attn = self.runner.model, self.runner.attn
        pool = None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            attn.metadata = self._metadata(size)
            args = (self.input_ids[:, :size], self.positions[:, :size], attn)
            model(*args)  # warm-up outside the capture: Triton compiles, allocator settles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = model(*args)[0]
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        """Copy a step's inputs into the static buffers, replay, return a view of the static output.

        Async scheduling needs nothing more: everything here is queued on the one stream in order.
        `inputs.input_ids` already holds the pending tokens gathered on the device (prepare), so the
        copy below reads them after that gather; the next step's copies into the static buffers
        queue after this replay; and the static output returned here is consumed (logits,
        sampling) before the next replay overwrites it.
        """
        n = inputs.input_ids.shape[1]
        size = next(s for s in self.sizes if s >= n)
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
