"""Pages of the preallocated KV cache: reference-counted, with an automatic prefix cache.

A sequence's page table covers all of its tokens. With prefix caching, every full page whose
tokens are computed is keyed by a chain hash (its tokens and the key of the page before it, so
equal keys mean equal prefixes), and stays in the cache after its sequences let go of it: a page
with no holder is either plain free or, when keyed, evictable (least recently released first).
A new or recomputed sequence starts with the keyed pages of its longest cached prefix; they are
shared, never written (only full pages are keyed, and a sequence writes only past its cached
prefix). What a page holds is what a recompute would write: KV quantization is per token and
head (kernels/kv_cache.py) and prefill attention reads the pages (docs/serving.md), so a
page's contents depend on its prefix only.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from qoq.engine.sequence import Sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_pages: deque[int] = deque(range(num_pages))  # no holder, no key
        self.evictable: OrderedDict[int, None] = OrderedDict()  # no holder, keyed; oldest release first
        self.ref_counts = [0] * num_pages
        self.page_key: dict[int, int] = {}  # page -> chain hash of its prefix
        self.cached: dict[int, int] = {}  # chain hash -> page
        self.num_queried_tokens = 0  # prefix-cache lookups, in tokens...
        self.num_hit_tokens = 0  # ...and how many of them were cached

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages) + len(self.evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    def missing_pages(self, seq: Sequence) -> int:
        """Pages `seq` lacks to hold all of its tokens (the one fed next step included)."""
        return max(0, pages_needed(seq.num_tokens, self.page_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence) -> bool:
        return self.missing_pages(seq) <= self.num_free_pages

    def grow(self, seq: Sequence) -> None:
        """Give `seq` the pages it lacks (prefill: all of them; decode: at most one)."""
        missing = self.missing_pages(seq)
        assert missing <= self.num_free_pages, "caller must check can_grow first"
        for _ in range(missing):
            seq.block_table.append(self._take_page())

    def _take_page(self) -> int:
        if self.free_pages:
            page = self.free_pages.popleft()
        else:  # evict the least recently released cached page
            page, _ = self.evictable.popitem(last=False)
            del self.cached[self.page_key.pop(page)]
        assert self.ref_counts[page] == 0
        self.ref_counts[page] = 1
        return page

    def free(self, seq: Sequence) -> None:
        """Let go of the sequence's pages. Keyed pages stay cached; the last pages go first in
        the eviction order (a prefix's tail is less likely to be shared than its head)."""
        self.cache_full_pages(seq)
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, f"page {page} released more often than taken"
            if self.ref_counts[page] == 0:
                if page in self.page_key:
                    self.evictable[page] = None
                else:
                    self.free_pages.append(page)
        seq.block_table = []
        seq.num_hashed_pages, seq.prefix_key = 0, None
        seq.num_computed_tokens = 0

    # -- prefix cache ------------------------------------------------------------------------
    def forget_cached_pages(self) -> None:
        """Drop every key (pages without holders become plain free): after a failed step, pages
        keyed at scheduling time may never have been written."""
        assert not any(self.ref_counts), "only while no sequence holds pages"
        self.free_pages.extend(self.evictable)
        self.evictable.clear()
        self.page_key.clear()
        self.cached.clear()

    def _key(self, tokens: list[int], index: int, parent: int | None) -> int:
        # Python's tuple hash: 64 bits, deterministic for ints; a false match needs a collision.
        return hash((parent, tuple(tokens[index * self.page_size : (index + 1) * self.page_size])))

    def allocate_prefill(self, seq: Sequence, prefix: tuple[list[int], int | None]) -> None:
        """Pages for all tokens of a sequence about to be (re)prefilled, its cached prefix
        (`cached_prefix(seq)`) first: sets `seq.num_computed_tokens` to the cached tokens. The
        caller checks `can_allocate_prefill` first."""
        assert not seq.block_table
        hits, seq.prefix_key = prefix
        for page in hits:
            if self.ref_counts[page] == 0:
                del self.evictable[page]
            self.ref_counts[page] += 1
        seq.block_table = hits
        seq.num_hashed_pages = len(hits)
        seq.num_computed_tokens = len(hits) * self.page_size
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        self.grow(seq)

    def can_allocate_prefill(self, seq: Sequence, prefix: tuple[list[int], int | None]) -> bool:
        hits, _ = prefix
        reused_free = sum(self.ref_counts[p] == 0 for p in hits)  # counted in num_free_pages now
        return pages_needed(seq.num_tokens, self.page_size) - len(hits) <= self.num_free_pages - reused_free

    def cached_prefix(self, seq: Sequence) -> tuple[list[int], int | None]:
        """The pages of the longest cached prefix of `seq` and the key of the last one (at least
        one token is left out: its logits pick the next token)."""
        pages: list[int] = []
        key = None
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:  # it needs every position's logits
            return pages, key
        tokens = seq.all_token_ids
        for index in range((len(tokens) - 1) // self.page_size):  # leave >= 1 token to compute
            next_key = self._key(tokens, index, key)
            page = self.cached.get(next_key)
            if page is None:
                break
            pages.append(page)
            key = next_key
        return pages, key

    def cache_full_pages(self, seq: Sequence) -> None:
        """Key the sequence's pages that are full of computed tokens whose ids are known.

        Called where a sequence's computed tokens cross a page boundary (scheduler) and when it
        lets go of its pages. A prefix another page already holds (two requests computed it at
        once) keeps that page; this one stays unkeyed and is freed plainly."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.page_size
        if seq.num_hashed_pages >= full:
            return
        tokens = seq.all_token_ids
        key = seq.prefix_key
        for index in range(seq.num_hashed_pages, full):
            key = self._key(tokens, index, key)
            page = seq.block_table[index]
            if key not in self.cached and page not in self.page_key:
                self.cached[key] = page
                self.page_key[page] = key
        seq.num_hashed_pages, seq.prefix_key = full, key

    def slot(self, seq: Sequence, position: int) -> int:
        """The cache slot (page * page_size + offset) of the token at `position`."""
        return seq.block_table[position // self.page_size] * self.page_size + position % self.page_size
