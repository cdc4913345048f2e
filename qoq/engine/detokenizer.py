"""Token -> text, stop conditions, and the streamed deltas (same rules as qoq.generate).

A stop token ends the sequence without being kept; a stop string truncates the text where it
starts. While a sequence runs, the text handed out holds back what could still turn out to be
the start of a stop string, or half of a multi-byte character, so streamed text never has to be
taken back.
"""

from __future__ import annotations

from qoq.engine.sequence import RequestOutput, Sequence
from qoq.generate import truncate_at_stop


def append_token(seq: Sequence, token: int, tokenizer) -> None:
    """Record one sampled token; set seq.finish_reason when it ends the sequence."""
    params = seq.params
    if token in seq.stop_token_ids:
        seq.finish_reason = "stop"
        return
    seq.output_token_ids.append(token)
    if params.detokenize:
        seq.text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    if params.stop:
        seq.text, hit = truncate_at_stop(seq.text, params.stop)
        if hit:
            seq.finish_reason = "stop"
            return
    if len(seq.output_token_ids) >= params.max_tokens:
        seq.finish_reason = "length"


def _visible_text(seq: Sequence, finished: bool) -> str:
    if finished:
        return seq.text
    text = seq.text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes to U+FFFD for now
    hold = max((len(s) for s in seq.params.stop), default=1) - 1
    return text[: len(text) - hold] if hold else text


def make_output(seq: Sequence, finished: bool) -> RequestOutput:
    """The delta since the last output of `seq`, and its totals so far."""
    visible = _visible_text(seq, finished)
    new_text = visible[seq.num_text_sent :]
    seq.num_text_sent = max(seq.num_text_sent, len(visible))
    new_tokens = seq.output_token_ids[seq.num_tokens_sent :]
    seq.num_tokens_sent = len(seq.output_token_ids)
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=new_tokens,
        new_text=new_text,
        token_ids=list(seq.output_token_ids),
        text=seq.text,
        finished=finished,
        finish_reason=seq.finish_reason if finished else None,
        num_prompt_tokens=seq.num_prompt_tokens,
        prompt_token_ids=seq.prompt_token_ids,
    )
