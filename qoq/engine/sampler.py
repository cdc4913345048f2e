"""Next tokens for a batch whose rows each carry their own SamplingParams (reuses qoq.sampling)."""

from __future__ import annotations

import torch

from qoq.engine.sequence import Sequence
from qoq.sampling import sample


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> list[int]:
    """logits [N, V] (row i for seqs[i]) -> N token ids.

    Greedy rows take one batched argmax; sampling rows go one by one so each request's own seeded
    generator draws exactly what the reference generator draws for it.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            gen = seq.generator if seq.generator is not None else generator
            tokens[i] = int(sample(logits[i : i + 1], seq.params, gen)[0])
    return tokens
