"""Requests as plain data: a Sequence is one prompt being generated, a RequestOutput what it yields.

While RUNNING a sequence has pages for all of its tokens; `num_computed_tokens` of them are
written (or being written by a launched step). Its prefill may take several steps (chunked
prefill) and may start past a cached prefix (block_manager.py); once all but the last token are
computed, each step decodes one token. While WAITING it holds no pages. Preemption by recompute
drops the pages and sends the sequence back to WAITING with its generated tokens kept, so the
next prefill recomputes prompt + output (from the cached prefix that survived) and generation
continues where it stopped.

With async scheduling (docs/serving.md) a sequence may have one token sampled on the device whose
value the engine has not read back yet: `num_pending` (0 or 1 between steps). It counts in
`num_tokens`, so pages, positions and context lengths cover it; the next decode feeds it straight
from the device (`pending_row` is its row in the in-flight step's token tensor). It lands in
`output_token_ids` when that step is processed.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from qoq.sampling import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # page ids, in token order
    finish_reason: str | None = None  # "stop", "length", "abort" (client gone) or "error" (engine failed it)
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # per-request RNG when the request gives a seed
    # Detokenizer state: text decoded so far and how much of it was already handed out.
    text: str = ""
    num_text_sent: int = 0
    num_tokens_sent: int = 0
    detokenizer_state: object | None = None  # qoq.engine.detokenizer's incremental-decode window
    # Async scheduling: tokens sampled on the device, not read back yet, and the row of the latest
    # one in its step's token tensor.
    num_pending: int = 0
    pending_row: int = -1
    # KV cache progress: tokens scheduled into the pages, and the prefix cache's bookkeeping
    # (pages keyed so far, the chain hash of the last of them).
    num_computed_tokens: int = 0
    num_hashed_pages: int = 0
    prefix_key: int | None = None
    # Requests that ask for them (engine/logprobs.py): an entry per output token, and per prompt
    # token (the first None: nothing precedes it); the sum of the sampled tokens' logprobs.
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    prompt_ids_device: torch.Tensor | None = None  # repetition_penalty: the prompt's distinct ids

    def __post_init__(self) -> None:
        # Read on every step for every row: plain attributes, so plain rows cost one lookup each.
        self.processes_logits = self.params.processes_logits
        self.has_extras = self.processes_logits or self.params.logprobs is not None
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked and not all recorded: its prefill must compute every position."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)
    # Structured output: the llguidance matcher following output_token_ids (engine/guided.py).
    guide: object | None = None

    @property
    def num_tokens(self) -> int:
        """All tokens, pending ones included (what the cache and the next decode position cover)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the engine holds (prompt + output_token_ids)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        """The last known token (with a pending token, the one before it)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and the totals so far.

    Streaming consumers use the deltas; the offline API keeps the last one (`token_ids`, `text`
    are the whole generation then). `token_ids` is the sequence's own list, not a copy (one copy
    per request per step costs milliseconds at batch 1000): while the request runs it keeps
    growing, so copy it to keep a snapshot.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # finish_reason "error": what went wrong
    # Only for requests that ask (SamplingParams.logprobs / prompt_logprobs), else None:
    new_logprobs: list | None = None  # an entry (engine/logprobs.py) per token of new_token_ids
    prompt_logprobs: list | None = None  # with the request's first output only
    cumulative_logprob: float | None = None

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
