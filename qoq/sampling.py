"""Sampling parameters and the token sampler shared by the generator and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.output_kind not in ("delta", "final"):
            raise ValueError(f"output_kind must be 'delta' or 'final', got {self.output_kind!r}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    kth = sorted_logits.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(use_k[:, None] & (sorted_logits < kth), float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
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
