"""Structured output: a grammar (llguidance) decides which tokens a sequence may take next.

A request's `SamplingParams.grammar` is an llguidance grammar (JSON text; `build_grammar` makes
one from a JSON schema, a regex or a Lark / GBNF grammar). The engine compiles it once
(`Guidance`: compiled matchers are cached by their grammar text and deep-copied per sequence)
and keeps a matcher on the sequence (`Sequence.guide`). The matcher follows the sequence's
accepted output tokens only (`accept_token`, called where a sampled token is recorded), so a
token dropped in flight or a preemption by recompute (which re-prefills the tokens without
recording them again) leaves it where it was.

Each step, `apply_guidance` asks the guided rows' matchers for their token masks (one bit per
token, filled on the host), uploads them packed (V/32 int32 words per guided row, no sync) and
sets the forbidden logits to -inf on the device before sampling, greedy or not. Unguided rows
cost nothing; a step without guided rows does no work here. EOS is in the mask only when the
grammar accepts; a sequence whose matcher has stopped (nothing more can follow) finishes with
"stop" at once.

Async scheduling: a guided sequence's next mask needs its previous token, so the scheduler does
not decode a guided sequence while its last token is in flight (docs/serving.md, the cost).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from qoq.engine.sequence import Sequence
from qoq.engine.transfer import to_device

GRAMMAR_KINDS = ("json_schema", "regex", "lark", "gbnf")


class GrammarError(ValueError):
    """A grammar (or schema) llguidance cannot compile; the message says why."""


def build_grammar(kind: str, spec: str | dict) -> str:
    """An llguidance grammar (JSON text) from a JSON schema (dict or text), a regex, a Lark grammar
    or a GBNF grammar (converted to Lark by llguidance). Raises GrammarError on a malformed spec;
    whether the grammar compiles is checked by `Guidance.check` / `new_matcher`."""
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}: one of {', '.join(GRAMMAR_KINDS)}")
    if kind == "json_schema":
        if not isinstance(spec, (dict, bool)):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise GrammarError(f"the JSON schema is not JSON: {err}") from err
        if not isinstance(spec, (dict, bool)):
            raise GrammarError("a JSON schema must be an object (or true / false)")
        try:
            return LLMatcher.grammar_from_json_schema(json.dumps(spec))  # key order is output order
        except ValueError as err:
            raise GrammarError(f"invalid JSON schema: {err}") from err
    if not isinstance(spec, str) or not spec:
        raise GrammarError(f"a {kind} grammar must be a non-empty string")
    try:
        return llguidance.grammar_from("gbnf" if kind == "gbnf" else kind, spec)
    except ValueError as err:
        raise GrammarError(str(err)) from err


def make_tokenizer(hf_tokenizer, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer:
    """llguidance's view of an HF fast tokenizer (~1 s: build once). Masks are `vocab_size` wide
    (the logits'); the mask allows `eos_token_ids` where the grammar accepts."""
    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
    except ValueError as err:
        raise GrammarError(f"structured output needs a fast (Rust) Hugging Face tokenizer: {err}") from err


class Guidance:
    """Grammars compiled against one tokenizer, cached by their text (thread-safe)."""

    def __init__(self, tokenizer: LLTokenizer, max_cached: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self._compiled: OrderedDict[str, LLMatcher | str] = OrderedDict()  # grammar -> fresh matcher | error
        self._lock = threading.Lock()

    def _compile(self, grammar: str) -> LLMatcher | str:
        with self._lock:
            hit = self._compiled.get(grammar)
            if hit is not None:
                self._compiled.move_to_end(grammar)
                return hit
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)  # drops the GIL while it compiles
        result = (matcher.get_error() or "unknown error") if matcher.is_error() else matcher
        with self._lock:
            self._compiled[grammar] = result
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return result

    def check(self, grammar: str) -> None:
        """Raise GrammarError saying why when `grammar` does not compile."""
        result = self._compile(grammar)
        if isinstance(result, str):
            raise GrammarError(result.strip())

    def new_matcher(self, grammar: str) -> LLMatcher:
        """A matcher at the grammar's start (a copy of the cached compiled one)."""
        self.check(grammar)
        return self._compile(grammar).deep_copy()


def accept_token(seq: Sequence, token: int) -> None:
    """Feed a recorded token to `seq`'s matcher (after detokenizer.append_token). A matcher that
    can take nothing more finishes the sequence with "stop", even on its max_tokens-th token."""
    if seq.finish_reason not in (None, "length"):  # an EOS (allowed only where the grammar accepts), a stop string
        return
    matcher: LLMatcher = seq.guide
    if not matcher.consume_token(token):
        raise ValueError(f"token {token} does not follow the grammar: {matcher.get_error()}")
    if matcher.is_stopped():
        seq.finish_reason = "stop"


_executor: LLExecutor | None = None


def fill_bitmask(matchers: list[LLMatcher], vocab_size: int, pin: bool) -> torch.Tensor:
    """The matchers' next-token masks on the host: [len(matchers), ceil(vocab_size / 32)] int32,
    bit t % 32 of word t // 32 set where token t is allowed."""
    global _executor
    words = (vocab_size + 31) // 32
    mask = torch.empty((len(matchers), words), dtype=torch.int32, pin_memory=pin)
    for m in matchers:
        if m.is_error():
            raise ValueError(f"the grammar matcher failed: {m.get_error()}")
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
    else:  # in parallel on llguidance's threads (the GIL released)
        if _executor is None:
            _executor = LLExecutor()
        _executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.data_ptr(), words * 4,
                                          len(matchers))
    return mask


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits[rows[i], t] = -inf where bit t of bitmask[i] is clear (in place, on the logits'
    device; tokens past the mask's width are forbidden)."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    masked = logits.index_select(0, rows).masked_fill_(~allowed[:, :vocab], float("-inf"))
    logits.index_copy_(0, rows, masked)


def apply_guidance(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Mask the logits [N, V] of the guided rows among `seqs` (row i is seqs[i]) in place."""
    rows = [i for i, s in enumerate(seqs) if s.guide is not None]
    if not rows:
        return
    dev = logits.device
    host = fill_bitmask([seqs[i].guide for i in rows], logits.shape[-1], pin=dev.type == "cuda")
    # Pinned: queued without waiting for the device; the caching host allocator keeps the block
    # until the copy has run.
    bitmask = host.to(dev, non_blocking=True)
    apply_bitmask(logits, to_device(rows, torch.long, dev), bitmask)
