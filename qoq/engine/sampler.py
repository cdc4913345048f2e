"""Next tokens for a batch whose rows each carry their own SamplingParams (reuses qoq.sampling)."""

from __future__ import annotations

import torch

from qoq.engine.sequence import Sequence
from qoq.sampling import filter_logits_rows, sample


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> list[int]:
    """logits [N, V] (row i for seqs[i]) -> N token ids.

    Greedy rows take one batched argmax. Sampling rows without a seed of their own are filtered
    (temperature, top-k, top-p, each row its own) and drawn in one batched pass from the engine's
    generator; a row with its own seeded generator is drawn alone, so it gets exactly what
    qoq.generate draws for the same seed.
    """
    tokens = logits.argmax(dim=-1).tolist()
    shared = [i for i, s in enumerate(seqs) if not s.params.greedy and s.generator is None]
    if shared:
        rows = torch.tensor(shared, device=logits.device)
        params = [seqs[i].params for i in shared]
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        scaled = logits[rows].float() / temperature[:, None]
        if any(p.top_k or p.top_p < 1.0 for p in params):  # the filters sort the whole vocabulary
            top_k = torch.tensor([p.top_k for p in params], device=logits.device)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)
            scaled = filter_logits_rows(scaled, top_k, top_p)
        draws = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1).tolist()
        for i, token in zip(shared, draws):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if not seq.params.greedy and seq.generator is not None:
            tokens[i] = int(sample(logits[i : i + 1], seq.params, seq.generator)[0])
    return tokens
