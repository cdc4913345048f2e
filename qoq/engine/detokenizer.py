"""Token -> text, stop conditions, and the streamed deltas (a full decode after every token would give the same).

A stop token ends the sequence without being kept; a stop string truncates the text where it
starts. The text is built incrementally: each step decodes only a small window of the latest
token ids, never the whole output.

The window (as in vLLM's incremental detokenization) is ids[prefix_offset:]; ids[prefix_offset:
read_offset] were already turned into text. With
    prefix_text = decode(ids[prefix_offset:read_offset]),  window_text = decode(ids[prefix_offset:])
the new text is window_text[len(prefix_text):]. Decoding the already-read tokens again as a
prefix keeps what depends on context right (a SentencePiece word piece drops its leading space
only at the start of a decode, so the prefix absorbs that). The new text is taken (and the
window slides: prefix_offset = read_offset, read_offset = len(ids)) only once it is stable: it
grew and does not end in U+FFFD, which is what an incomplete multi-byte UTF-8 character (an
emoji or a CJK character split over byte tokens) decodes to until its last byte arrives. Until
then it stays the sequence's pending tail, and when the sequence finishes the tail is taken as it
is, so the streamed text always adds up to decode(all output ids).

While a sequence runs, the text handed out also holds back what could still turn out to be the
start of a stop string, so streamed text never has to be taken back. Stop strings are searched
in the decoded text, pending tail included, from a stop string's length before the new text,
so a stop string split across tokens (or steps) is found where a full decode finds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qoq.engine.sequence import RequestOutput, Sequence
from qoq.engine.stops import truncate_at_stop

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerState:
    """Per-sequence window of the incremental decode (kept on the Sequence, see `_state`)."""

    prefix_offset: int = 0  # first output id of the decoded window
    read_offset: int = 0  # output ids before this one are in seq.text
    tail: str = ""  # text of ids[read_offset:] that is not stable yet (may end in U+FFFD)


def _state(seq: Sequence) -> DetokenizerState:
    state = seq.detokenizer_state
    if state is None:
        state = DetokenizerState()
        seq.detokenizer_state = state
    return state


def _decode_new_token(seq: Sequence, tokenizer) -> None:
    """Move what the latest token makes stable from the window into seq.text."""
    state = _state(seq)
    ids = seq.output_token_ids
    prefix_text = ("" if state.read_offset == state.prefix_offset else
                   tokenizer.decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=True))
    window_text = tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=True)
    new_text = window_text[len(prefix_text) :]
    if len(window_text) > len(prefix_text) and not window_text.endswith(REPLACEMENT_CHAR):
        seq.text += new_text
        state.prefix_offset, state.read_offset, state.tail = state.read_offset, len(ids), ""
    else:
        state.tail = new_text


def _flush(seq: Sequence) -> None:
    """The sequence is done: its pending tail is final as it is."""
    state = _state(seq)
    if state.tail:
        seq.text += state.tail
    state.prefix_offset = state.read_offset = len(seq.output_token_ids)
    state.tail = ""


def append_token(seq: Sequence, token: int, tokenizer) -> None:
    """Record one sampled token; set seq.finish_reason when it ends the sequence."""
    params = seq.params
    if token in seq.stop_token_ids:
        seq.finish_reason = "stop"
        _flush(seq)
        return
    seq.output_token_ids.append(token)
    if params.detokenize:
        checked = len(seq.text)  # seq.text up to here was searched for stop strings already
        _decode_new_token(seq, tokenizer)
        if params.stop:
            # Text before `start` cannot hold the start of a stop string that ends in new text.
            start = max(0, checked - max(len(s) for s in params.stop) + 1)
            recent = seq.text[start:] + _state(seq).tail
            recent, hit = truncate_at_stop(recent, params.stop)
            if hit:
                seq.text = seq.text[:start] + recent
                seq.finish_reason = "stop"
                _state(seq).tail = ""  # already in `recent`
                _flush(seq)
                return
    if len(seq.output_token_ids) >= params.max_tokens:
        seq.finish_reason = "length"
        _flush(seq)


def _visible_text(seq: Sequence, finished: bool) -> str:
    if finished:
        return seq.text
    # seq.text holds only stable text (no half characters); keep back a possible stop-string start.
    # (Clamped at 0: a text shorter than the hold shows nothing yet.)
    stop = seq.params.stop
    hold = max(map(len, stop)) - 1 if stop else 0
    return seq.text[: max(0, len(seq.text) - hold)] if hold else seq.text


def make_output(seq: Sequence, finished: bool) -> RequestOutput:
    """The delta since the last output of `seq`, and its totals so far."""
    if finished:
        _flush(seq)  # an aborted sequence ends here, not in append_token
    visible = _visible_text(seq, finished)
    new_text = visible[seq.num_text_sent :]
    seq.num_text_sent = max(seq.num_text_sent, len(visible))
    sent = seq.num_tokens_sent
    new_tokens = seq.output_token_ids[sent:]
    seq.num_tokens_sent = len(seq.output_token_ids)
    out = RequestOutput(
        request_id=seq.request_id,
        new_token_ids=new_tokens,
        new_text=new_text,
        token_ids=seq.output_token_ids,
        text=seq.text,
        finished=finished,
        finish_reason=seq.finish_reason if finished else None,
        num_prompt_tokens=seq.num_prompt_tokens,
        prompt_token_ids=seq.prompt_token_ids,
    )
    if seq.logprobs is not None or seq.prompt_logprobs is not None:
        _add_logprobs(out, seq, sent)
    return out


def _add_logprobs(out: RequestOutput, seq: Sequence, sent: int) -> None:
    if seq.params.logprobs is not None:
        out.new_logprobs = (seq.logprobs or [])[sent:]
        out.cumulative_logprob = seq.cumulative_logprob
    if sent == 0 and seq.prompt_logprobs is not None:  # the first output carries them
        out.prompt_logprobs = seq.prompt_logprobs
