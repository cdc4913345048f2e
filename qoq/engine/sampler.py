"""Next tokens for a batch whose rows each carry their own SamplingParams (reuses qoq.sampling)."""

from __future__ import annotations

import torch

from qoq.engine.guided import apply_guidance
from qoq.engine.sequence import Sequence
from qoq.engine.transfer import to_device
from qoq.sampling import apply_penalties, argmax_rows, draw_one, filter_logits_rows, sample


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
    apply_guidance(logits, seqs)  # structured output: forbidden tokens -> -inf (no-op without guided rows)
    tokens = argmax_rows(logits)
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


def process_logits(logits: torch.Tensor, seqs: list[Sequence], last_ids: torch.Tensor | None) -> None:
    """min_tokens, logit_bias and the penalties, in place on the rows of logits [N, V] whose
    sequences ask for them (none: nothing runs). All on the device, without a sync.

    What each row needs goes up as flat (row, token) lists: the generated tokens the engine knows,
    and, for a sequence whose last token is still in flight (async scheduling, `num_pending`), that
    token from `last_ids` [N] (each row's input id this step: the pending token itself, gathered
    on the device from the previous step). Cost per step: O(generated tokens) of those rows on the
    host, O(rows x vocabulary) on the device; prompts are uploaded once per sequence.
    """
    rows = [i for i, s in enumerate(seqs) if s.processes_logits]
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[-1]
    mask_rows, mask_ids, bias_rows, bias_ids, biases = [], [], [], [], []
    pen_rows = []
    for i in rows:
        seq, params = seqs[i], seqs[i].params
        if len(seq.output_token_ids) + seq.num_pending < params.min_tokens:
            stops = [t for t in seq.stop_token_ids if t < vocab]
            mask_rows += [i] * len(stops)
            mask_ids += stops
        if params.logit_bias:
            bias_rows += [i] * len(params.logit_bias)
            bias_ids += params.logit_bias.keys()
            biases += params.logit_bias.values()
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            pen_rows.append(i)
    if bias_rows:
        index = (to_device(bias_rows, torch.long, dev), to_device(bias_ids, torch.long, dev))
        logits.index_put_(index, to_device(biases, torch.float32, dev).to(logits.dtype), accumulate=True)
    if pen_rows:
        _penalize(logits, [seqs[i] for i in pen_rows], pen_rows, last_ids)
    if mask_rows:  # last: a bias cannot lift a masked stop token
        index = (to_device(mask_rows, torch.long, dev), to_device(mask_ids, torch.long, dev))
        logits.index_put_(index, torch.full((len(mask_rows),), float("-inf"), dtype=logits.dtype, device=dev))


def _penalize(logits: torch.Tensor, seqs: list[Sequence], rows: list[int], last_ids: torch.Tensor | None) -> None:
    dev, vocab = logits.device, logits.shape[-1]
    num = len(rows)
    out_rows, out_ids, pending = [], [], []
    prompts = []
    for r, seq in enumerate(seqs):
        out_rows += [r] * len(seq.output_token_ids)
        out_ids += seq.output_token_ids
        if seq.num_pending:
            pending.append(r)
        if seq.params.repetition_penalty != 1.0:
            if seq.prompt_ids_device is None:  # the prompt never changes: up once
                seq.prompt_ids_device = to_device(sorted(set(seq.prompt_token_ids)), torch.long, dev)
            prompts.append((r, seq.prompt_ids_device))
    counts = torch.zeros(num, vocab, dtype=torch.int32, device=dev)
    flat_rows = to_device(out_rows, torch.long, dev)
    flat_ids = to_device(out_ids, torch.long, dev)
    if pending:
        assert last_ids is not None, "a pending token needs this step's input ids"
        pending_rows = to_device(pending, torch.long, dev)
        src = to_device([rows[r] for r in pending], torch.long, dev)
        flat_rows = torch.cat([flat_rows, pending_rows])
        flat_ids = torch.cat([flat_ids, last_ids.index_select(0, src)])
    counts.index_put_((flat_rows, flat_ids), torch.ones_like(flat_ids, dtype=torch.int32), accumulate=True)
    prompt_mask = torch.zeros(num, vocab, dtype=torch.bool, device=dev)
    if prompts:
        p_rows = torch.cat([torch.full_like(ids, r) for r, ids in prompts])
        p_ids = torch.cat([ids for _, ids in prompts])
        prompt_mask.index_put_((p_rows, p_ids), torch.ones_like(p_ids, dtype=torch.bool))
    params = [s.params for s in seqs]
    index = to_device(rows, torch.long, dev)
    sub = logits.index_select(0, index)
    apply_penalties(sub, counts, prompt_mask,
                    to_device([p.presence_penalty for p in params], torch.float32, dev),
                    to_device([p.frequency_penalty for p in params], torch.float32, dev),
                    to_device([p.repetition_penalty for p in params], torch.float32, dev))
    logits.index_copy_(0, index, sub)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> list[int]:
    """sample_tokens_device, read back: N token ids (synchronous scheduling)."""
    return sample_tokens_device(logits, seqs, generator).tolist()
