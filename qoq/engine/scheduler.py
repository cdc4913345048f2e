"""In-flight batching: which sequences run in the next step, and which tokens of each.

Each step first gives every running sequence that has finished its prefill its next decode token
(growing its page table by a page when it crosses a page boundary), preempting the newest
running sequences by recompute when pages run out. The rest of the token budget goes to prompt
chunks: first the running sequences still mid-prefill, then waiting sequences, admitted while
the sequence limit and the free pages allow (each gets pages for all its tokens at once, its
cached prefix first). Without chunked prefill a prompt is admitted only whole. Prefill chunks
and decode tokens share one flattened forward pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qoq.engine.block_manager import BlockManager
from qoq.engine.config import EngineConfig
from qoq.engine.sequence import Sequence, SequenceStatus


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # position of its first token (tokens before it are in the pages)
    num_tokens: int
    samples: bool  # the chunk ends the sequence's known tokens: its last logits pick the next token


@dataclass
class ScheduledBatch:
    chunks: list[PrefillChunk] = field(default_factory=list)  # prompt (+ output after preemption) pieces
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def prefills(self) -> list[Sequence]:
        """Sequences whose prefill ends this step (they sample)."""
        return [c.seq for c in self.chunks if c.samples]

    @property
    def seqs(self) -> list[Sequence]:
        return self.prefills + self.decodes  # the sampling rows: the order of the logits

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks) + len(self.decodes)

    def __bool__(self) -> bool:
        return bool(self.chunks or self.decodes)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.page_size = block_manager.page_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admission first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_decodes(batch, self.max_num_batched_tokens)
        if not batch.preempted:  # admitting new work right after preempting would only thrash
            budget = self._schedule_running_chunks(batch, budget)
            self._schedule_prefills(batch, budget)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        queue = deque(self.running)
        still_running: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            if seq.num_tokens - seq.num_computed_tokens > 1:  # mid-prefill: a chunk, later
                still_running.append(seq)
                continue
            if seq.num_pending and len(seq.output_token_ids) + seq.num_pending >= seq.params.max_tokens:
                # Async scheduling: its in-flight token is its last (max_tokens), so a decode now
                # would only compute a token to throw away. It finishes when that step is processed.
                still_running.append(seq)
                continue
            if seq.num_pending and seq.guide is not None:
                # Structured output: its next token mask needs the token in flight (engine/guided.py).
                still_running.append(seq)
                continue
            if budget == 0:  # over the token budget: keeps its pages, decodes next step
                still_running.append(seq)
                continue
            if seq.num_tokens <= len(seq.block_table) * self.page_size:  # fast path: no new page
                batch.decodes.append(seq)
                still_running.append(seq)
                seq.num_computed_tokens = seq.num_tokens
                budget -= 1
                continue
            while not self.block_manager.can_grow(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                self.block_manager.grow(seq)
                batch.decodes.append(seq)
                still_running.append(seq)
                seq.num_computed_tokens = seq.num_tokens
                self.block_manager.cache_full_pages(seq)  # the page before the new one is full
                budget -= 1
        self.running = still_running
        return budget

    def _schedule_running_chunks(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_tokens - seq.num_computed_tokens > 1:
                budget -= self._add_chunk(batch, seq, budget)
        return budget

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        """Schedule the next piece of `seq`'s prefill (all of it when it fits); returns its size.
        A last piece of one token is a decode (the decode kernel covers it as well)."""
        start = seq.num_computed_tokens
        remaining = seq.num_tokens - start
        if remaining == 1:
            batch.decodes.append(seq)
            seq.num_computed_tokens = seq.num_tokens
            return 1
        num = min(remaining, budget)
        batch.chunks.append(PrefillChunk(seq, start, num, samples=num == remaining))
        seq.num_computed_tokens = start + num
        self.block_manager.cache_full_pages(seq)
        return num

    def _schedule_prefills(self, batch: ScheduledBatch, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.num_pending:
                # Preempted with a token still in flight: prefilled once that token is known (the
                # step that sampled it is processed before the next schedule). Never happens in
                # practice: prefills are not admitted in a step that preempts.
                break
            prefix = bm.cached_prefix(seq)
            to_compute = seq.num_tokens - len(prefix[0]) * self.page_size
            if (not self.chunked_prefill and to_compute > budget) or not bm.can_allocate_prefill(seq, prefix):
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            bm.allocate_prefill(seq, prefix)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._add_chunk(batch, seq, budget)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute later: drop the pages, keep the tokens, go first in line."""
        self._requeue(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)

    def _requeue(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # -- isolating a failed step (LLMEngine._isolate) ----------------------------------------
    def requeue_all(self) -> list[Sequence]:
        """Every running sequence back to the front of the waiting queue, in admission order,
        its pages dropped (recomputed later): a failed step left their cache state unknown."""
        seqs, self.running = self.running, []
        for seq in reversed(seqs):
            self._requeue(seq)
        return seqs

    def schedule_alone(self, seq: Sequence) -> ScheduledBatch:
        """A step of `seq` and nothing else: its next prefill chunk, admitting it first. The
        engine runs this only while no other sequence holds pages, so they are there."""
        batch = ScheduledBatch()
        if seq.status is SequenceStatus.WAITING:
            prefix = self.block_manager.cached_prefix(seq)
            assert self.block_manager.can_allocate_prefill(seq, prefix), "a request always fits the whole cache"
            self.waiting.remove(seq)
            self.block_manager.allocate_prefill(seq, prefix)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        self._add_chunk(batch, seq, self.max_num_batched_tokens)
        return batch

    def requeue(self, seq: Sequence) -> None:
        """A running sequence back to the front of the waiting queue (its full pages stay cached)."""
        self.running.remove(seq)
        self._requeue(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finished or aborted: leave whichever queue holds it and free its pages.

        With async scheduling the sequence may still be in the step in flight (its token there is
        discarded when that step is processed), and a sequence preempted with a token in flight
        finishes from WAITING. Freeing its pages at once is safe: the in-flight step was enqueued
        on the device stream before any later step that could be given those pages, so its writes
        land before theirs.
        """
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
