"""Pages of the preallocated KV cache: a free list and one page table per running sequence.

No prefix sharing: the prefill kernel attends only to the fresh K/V of its own tokens, so a
sequence always owns all of its pages (see docs/serving.md for what shared prefixes need).
"""

from __future__ import annotations

from collections import deque

from qoq.engine.sequence import Sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.free_pages: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free_pages)

    def missing_pages(self, seq: Sequence) -> int:
        """Pages `seq` lacks to hold all of its tokens (the one fed next step included)."""
        return max(0, pages_needed(seq.num_tokens, self.page_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence) -> bool:
        return self.missing_pages(seq) <= len(self.free_pages)

    def grow(self, seq: Sequence) -> None:
        """Give `seq` the pages it lacks (prefill: all of them; decode: at most one)."""
        missing = self.missing_pages(seq)
        assert missing <= len(self.free_pages), "caller must check can_grow first"
        seq.block_table.extend(self.free_pages.popleft() for _ in range(missing))

    def free(self, seq: Sequence) -> None:
        self.free_pages.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """The cache slot (page * page_size + offset) of the token at `position`."""
        return seq.block_table[position // self.page_size] * self.page_size + position % self.page_size
