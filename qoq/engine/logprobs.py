"""Logprobs on the device, read back with the step's tokens.

Both kinds are of the model's raw distribution, log_softmax of the logits before any processing
(temperature, penalties, bias), as vLLM returns by default. Only the rows that ask compute them.
A token's entry is a plain tuple, cheap to pickle (the server's engine is another process):
`(token_id, logprob, ((top_id, top_logprob), ...))`, the top ones most likely first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.engine.transfer import DeviceToHost, to_device

TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]
PROMPT_ROWS_PER_SLICE = 1024  # prompt logits are [rows, vocab] fp32: computed a slice at a time


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """logits [N, V], tokens [N] -> [N, 1 + 2k] fp32: each token's logprob, the top-k logprobs,
    then the top-k ids (exact as floats below 2^24, any vocabulary)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])
    if not k:
        return chosen
    top = logp.topk(k, dim=-1)
    return torch.cat([chosen, top.values, top.indices.float()], dim=-1)


@dataclass
class LogprobsInFlight:
    """Logprobs computed by a launched step for some of its rows; read with its tokens."""

    rows: list[int]  # sampling rows (prompt logprobs: (seq, first position) pairs) they belong to
    ks: list[int]  # top-k each asked for
    k: int  # computed top-k (the largest asked)
    host: DeviceToHost
    ids: list[int] | None = None  # prompt logprobs: the tokens scored, one per value row
    counts: list[int] | None = None  # prompt logprobs: value rows per entry of `rows`

    def entries(self, tokens: list[int]) -> list[TokenLogprob]:
        """One entry per value row; tokens: the token each row scored."""
        k = self.k
        out = []
        for token, row in zip(tokens, self.host.tolist()):
            top = tuple(zip(map(int, row[1 + k:]), row[1 : 1 + k]))
            out.append((token, row[0], top))
        return out


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, seqs) -> LogprobsInFlight | None:
    """Logprobs of the sampled tokens for the rows whose request asks (None: no row does)."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    ks = [seqs[i].params.logprobs for i in rows]
    k = max(ks)
    index = to_device(rows, torch.long, logits.device)
    values = logprobs_of(logits.index_select(0, index), tokens.index_select(0, index), k)
    return LogprobsInFlight(rows, ks, k, DeviceToHost(values))


def prompt_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Logprobs of prompt tokens: hidden [T, H], rows [P] (the position before each target), targets [P]."""
    parts = []
    for start in range(0, rows.shape[0], PROMPT_ROWS_PER_SLICE):
        piece = rows[start : start + PROMPT_ROWS_PER_SLICE]
        logits = model.compute_logits(hidden.index_select(0, piece))
        parts.append(logprobs_of(logits, targets[start : start + PROMPT_ROWS_PER_SLICE], k))
    return torch.cat(parts)


def trim(entry: TokenLogprob, k: int) -> TokenLogprob:
    token, logprob, top = entry
    return (token, logprob, top[:k]) if len(top) > k else entry


def record_logprobs(step, tokens: list[int]) -> dict[int, TokenLogprob]:
    """Read a processed step's logprobs: prompt logprobs go into their sequences' lists at once;
    the sampled tokens' entries come back by seq_id (the engine appends those it keeps)."""
    prompt = step.prompt_logprobs
    if prompt is not None:
        entries = iter(prompt.entries(prompt.ids))
        for (seq, first), k, num in zip(prompt.rows, prompt.ks, prompt.counts):
            # first: the position of the first token scored; a recomputed prefill overwrites.
            lst = seq.prompt_logprobs
            del lst[first:]
            lst.extend(trim(next(entries), k) for _ in range(num))
    sampled = step.logprobs
    if sampled is None:
        return {}
    chosen = [tokens[row] for row in sampled.rows]
    by_seq = {}
    for row, k, entry in zip(sampled.rows, sampled.ks, sampled.entries(chosen)):
        by_seq[step.seqs[row].seq_id] = trim(entry, k)
    return by_seq
