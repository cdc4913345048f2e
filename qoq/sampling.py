"""Sampling parameters and the token sampler shared by the generator and the engine."""

from __future__ import annotations

import functools
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
MAX_PENALTY = 2.0  # presence / frequency penalties in [-2, 2], repetition_penalty in (0, 2] (OpenAI, vLLM)
MAX_LOGIT_BIAS = 100.0
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's limit)
MAX_CHOICES = 128  # n and best_of


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
    # Logits processing (engine/sampler.py applies it on the device; 0 / 1.0 / None are off).
    # OpenAI's penalties count the generated tokens only; repetition_penalty (HF, vLLM) divides a
    # positive logit (multiplies a negative one) of every token of prompt + output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    # Logprobs of the model's raw distribution (log_softmax of the logits, before any processing):
    # None off; k: the chosen token's and the k most likely ones, per generated (prompt_logprobs:
    # per prompt) token.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
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
        self._validate_processing()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingParamError(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
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

    def _validate_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_finite(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise SamplingParamError(name, f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        rep = self.repetition_penalty
        if not _is_finite(rep) or not 0 < rep <= MAX_PENALTY:
            raise SamplingParamError("repetition_penalty", f"repetition_penalty must be in (0, {MAX_PENALTY:g}] "
                                                           f"(1 = off), got {rep!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamError("min_tokens", f"min_tokens must be an integer in [0, max_tokens "
                                                   f"({self.max_tokens})], got {self.min_tokens!r}")
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise SamplingParamError("logit_bias", "logit_bias must map token ids to biases")
        for token, value in bias.items():
            if not _is_int(token) or not 0 <= token <= MAX_INT32:
                raise SamplingParamError("logit_bias", f"logit_bias keys must be token ids, got {token!r}")
            if not _is_finite(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise SamplingParamError("logit_bias", f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, "
                                                       f"{MAX_LOGIT_BIAS:g}], got {value!r} for token {token}")

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before sampling (penalties, min_tokens, logit_bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias)

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


def validate_choices(n: int, best_of: int | None, stream: bool) -> None:
    """n choices out of best_of candidates (the n with the highest cumulative logprob)."""
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise SamplingParamError("n", f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}")
    if best_of is None:
        return
    if not _is_int(best_of) or not n <= best_of <= MAX_CHOICES:
        raise SamplingParamError("best_of", f"best_of must be an integer in [n ({n}), {MAX_CHOICES}], got {best_of!r}")
    if stream and best_of != n:
        raise SamplingParamError("best_of", "best_of must equal n when streaming (the best choices are known "
                                            "only at the end)")


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Penalize logits [N, V] in place, each row its own values ([N] each).

    output_counts [N, V]: how often each token was generated; prompt_mask [N, V]: in the prompt.
    repetition (HF): a token of prompt or output has a positive logit divided by it, a negative
    one multiplied; then (OpenAI) logit -= frequency * count + presence * (count > 0).
    """
    seen = prompt_mask | (output_counts > 0)
    rep = repetition[:, None].expand_as(logits)
    factor = torch.where(logits > 0, 1.0 / rep, rep)
    logits.copy_(torch.where(seen, logits * factor, logits))
    counts = output_counts.to(logits.dtype)
    logits -= frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


# Greedy decoding at small batch: torch's argmax reduces a row of the vocabulary in one thread block
# (31 us for a 128K-vocabulary fp32 row on an H200, ~1% of a batch-1 step); cut into this many
# chunks, the first pass runs one block per chunk (17 us in two passes, the same call).
ARGMAX_CHUNKS = 256
ARGMAX_MIN_CHUNK = 64  # elements per chunk at least


@functools.lru_cache(maxsize=None)
def _argmax_chunks(vocab: int) -> int:
    """The largest divisor of vocab up to ARGMAX_CHUNKS whose chunks hold ARGMAX_MIN_CHUNK or more
    (a view, no padding copy); 1 where there is none worth splitting into."""
    for c in range(min(ARGMAX_CHUNKS, vocab // ARGMAX_MIN_CHUNK), 15, -1):
        if vocab % c == 0:
            return c
    return 1


def argmax_two_pass(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """x.argmax(dim=-1) of [B, V] (V a multiple of chunks) by chunk maxima, then the first chunk
    holding the row's maximum: the same first maximal index as one pass."""
    b, v = x.shape
    part, idx = x.view(b, chunks, v // chunks).max(dim=-1)
    best = part.argmax(dim=-1, keepdim=True)
    return (best * (v // chunks) + idx.gather(1, best)).squeeze(1)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [B, V]: in two passes on a GPU when the rows are few (see
    ARGMAX_CHUNKS), else torch's one pass."""
    if x.dim() != 2 or not x.is_cuda or x.shape[0] > 16 or not x.is_contiguous():
        return x.argmax(dim=-1)
    chunks = _argmax_chunks(x.shape[1])
    return x.argmax(dim=-1) if chunks == 1 else argmax_two_pass(x, chunks)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs [B, V] -> [B] int64: torch.multinomial(probs, 1).squeeze(-1).

    The same algorithm and random numbers as torch.multinomial's single-draw path (argmax of
    probs / q with q ~ Exp(1), from the same generator), hence the same tokens
    (tests/engine/test_async_scheduling.py checks it against torch.multinomial), without its checks that probs
    are finite and non-negative: those read values back, a device sync on the GPU, which would
    stall the engine's async scheduling.
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return argmax_rows(torch.div(probs, q, out=q))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> next token ids [B]."""
    if params.greedy:
        return argmax_rows(logits)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    return draw_one(logits.softmax(-1), generator)
