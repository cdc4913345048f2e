"""Sampling parameters and the token sampler shared by the generator and the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


# Bounds every value must keep (checked at the edge, so nothing out of range reaches the engine):
# integers the engine puts in int64 tensors stay far inside them; seeds are what
# torch.Generator.manual_seed takes.
MAX_INT32 = 2**31 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range
# Below this a temperature is greedy: logits / T would overflow fp32 (and T itself round to 0).
MIN_SAMPLING_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # a streamed request holds back this many characters at most
MAX_STOP_TOKEN_IDS = 256


class SamplingParamError(ValueError):
    """A sampling value out of range; `param` names the field (the HTTP error's "param")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """What to generate. temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    detokenize: bool = True  # False: token ids only (benchmarks), no text and no stop strings
    # What the serving engine hands out while the request runs: "delta" an output every step (the
    # new tokens and text, for streaming), "final" one output when it finishes (offline batches,
    # non-streaming HTTP requests: no per-step bookkeeping for thousands of sequences).
    output_kind: str = "delta"
    # Structured output: an llguidance grammar (JSON text) the output must follow
    # (qoq/engine/guided.py; the server builds it from response_format, guided_*, tool_choice).
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise SamplingParamError unless every value is one the engine can represent."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_INT32:
            raise SamplingParamError("max_tokens", f"max_tokens must be an integer in [1, {MAX_INT32}], "
                                                   f"got {self.max_tokens!r}")
        if not _is_finite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise SamplingParamError("temperature", f"temperature must be >= 0 and <= {MAX_TEMPERATURE:g} "
                                                    f"(0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_INT32:
            raise SamplingParamError("top_k", f"top_k must be an integer in [0, {MAX_INT32}] (0 = off), "
                                              f"got {self.top_k!r}")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SamplingParamError("seed", f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        self._validate_stops()
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise SamplingParamError("grammar", "grammar must be an llguidance grammar (a string)")
        if self.output_kind not in ("delta", "final"):
            raise SamplingParamError("output_kind", f"output_kind must be 'delta' or 'final', got {self.output_kind!r}")

    def _validate_stops(self) -> None:
        stop, ids = self.stop, self.stop_token_ids
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
            raise SamplingParamError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
        if any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in stop):
            raise SamplingParamError("stop", f"stop strings must be non-empty and at most {MAX_STOP_STRING_CHARS} "
                                             "characters long")
        if stop and not self.detokenize:
            raise SamplingParamError("stop", "stop strings need detokenize=True")
        if not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamError("stop_token_ids", f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
        if any(not _is_int(t) or not 0 <= t <= MAX_INT32 for t in ids):
            raise SamplingParamError("stop_token_ids", "stop_token_ids must be token ids (integers >= 0)")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with probability >= top_p."""
    if (not top_k or top_k >= logits.shape[-1]) and top_p >= 1.0:
        return logits
    rows = logits.reshape(-1, logits.shape[-1])
    full = torch.full((rows.shape[0],), 0, dtype=torch.long, device=logits.device)
    return filter_logits_rows(rows, full + top_k, full.float() + top_p).view_as(logits)


def filter_logits_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """filter_logits with its own top_k (0 = off) and top_p per row: [N, V], [N], [N] -> [N, V].

    One sort serves both filters: masking by a value threshold keeps the sorted order, so the
    top-k survivors are a prefix of it and top-p then works on that prefix, as filter_logits does.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    use_k = (top_k > 0) & (top_k < vocab)
    kth = sorted_logits.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])  # top_k >= vocab: use_k is False
    sorted_logits = sorted_logits.masked_fill(use_k[:, None] & (sorted_logits < kth), float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False  # even when top_p rounds to 0 in fp32
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs [B, V] -> [B] int64: torch.multinomial(probs, 1).squeeze(-1).

    The same algorithm and random numbers as torch.multinomial's single-draw path (argmax of
    probs / q with q ~ Exp(1), from the same generator), hence the same tokens
    (tests/engine/test_async_scheduling.py checks it against torch.multinomial), without its checks that probs
    are finite and non-negative: those read values back, a device sync on the GPU, which would
    stall the engine's async scheduling.
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.div(probs, q, out=q).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> next token ids [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    return draw_one(logits.softmax(-1), generator)
