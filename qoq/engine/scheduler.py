"""In-flight batching: which sequences run in the next step.

Each step first gives every running sequence its next decode token (growing its page table by a
page when it crosses a page boundary), preempting the newest running sequences by recompute when
pages run out, then admits waiting sequences as prefills while the token budget, the sequence
limit and the free pages allow. Prefill and decode tokens share one flattened forward pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qoq.engine.block_manager import BlockManager
from qoq.engine.config import EngineConfig
from qoq.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)  # whole prompt (+ output after preemption)
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.prefills + self.decodes  # the order of the flattened batch and of the logits

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.prefills) + len(self.decodes)

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
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
            self._schedule_prefills(batch, budget)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        queue = deque(self.running)
        still_running: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            if seq.num_pending and len(seq.output_token_ids) + seq.num_pending >= seq.params.max_tokens:
                # Async scheduling: its in-flight token is its last (max_tokens), so a decode now
                # would only compute a token to throw away. It finishes when that step is processed.
                still_running.append(seq)
                continue
            if budget == 0:  # over the token budget: keeps its pages, decodes next step
                still_running.append(seq)
                continue
            if seq.num_tokens <= len(seq.block_table) * self.page_size:  # fast path: no new page
                batch.decodes.append(seq)
                still_running.append(seq)
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
                budget -= 1
        self.running = still_running
        return budget

    def _schedule_prefills(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                # Preempted with a token still in flight: prefilled once that token is known (the
                # step that sampled it is processed before the next schedule). Never happens in
                # practice: prefills are not admitted in a step that preempts.
                break
            if seq.num_tokens > budget or not self.block_manager.can_grow(seq):
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            self.block_manager.grow(seq)
            seq.status = SequenceStatus.RUNNING
            batch.prefills.append(seq)
            self.running.append(seq)
            budget -= seq.num_tokens

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute later: drop the pages, keep the tokens, go first in line."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

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
