"""Next tokens for a batch whose rows each carry their own SamplingParams (reuses qoq.sampling)."""

from __future__ import annotations

import torch

from qoq.engine.sequence import Sequence
from qoq.engine.transfer import to_device
from qoq.sampling import draw_one, filter_logits_rows, sample


def sample_tokens_device(logits: torch.Tensor, seqs: list[Sequence],
                         generator: torch.Generator | None) -> torch.Tensor:
    """logits [N, V] (row i for seqs[i]) -> [N] int64 token ids on the logits' device, no sync.

    Greedy rows take one batched argmax. Sampling rows without a seed of their own are filtered
    (temperature, top-k, top-p, each row its own) and drawn in one batched pass from the engine's
    generator; a row with its own seeded generator is drawn alone, so it gets exactly what
    a plain loop (sampling.sample) draws for the same seed. Nothing here waits for the device: the row indices and
    parameters go up without a sync (transfer.to_device), the draws use `draw_one`
    (torch.multinomial's own single-draw algorithm without its validity checks, which read values
    back), and the results are written into the token tensor on the device.
    """
    tokens = logits.argmax(dim=-1)
    dev = logits.device
    shared = [i for i, s in enumerate(seqs) if not s.params.greedy and s.generator is None]
    if shared:
        params = [seqs[i].params for i in shared]
        rows = to_device(shared, torch.long, dev)
        temperature = to_device([p.temperature for p in params], torch.float32, dev)
        scaled = logits.index_select(0, rows).float() / temperature[:, None]
        if any(p.top_k or p.top_p < 1.0 for p in params):  # the filters sort the whole vocabulary
            top_k = to_device([p.top_k for p in params], torch.long, dev)
            top_p = to_device([p.top_p for p in params], torch.float32, dev)
            scaled = filter_logits_rows(scaled, top_k, top_p)
        tokens.index_copy_(0, rows, draw_one(scaled.softmax(-1), generator))
    for i, seq in enumerate(seqs):
        if not seq.params.greedy and seq.generator is not None:
            tokens[i] = sample(logits[i : i + 1], seq.params, seq.generator)[0]  # a device copy
    return tokens


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> list[int]:
    """sample_tokens_device, read back: N token ids (synchronous scheduling)."""
    return sample_tokens_device(logits, seqs, generator).tolist()
