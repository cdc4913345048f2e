"""When a sequence stops: the token ids that end it and the first stop string in its text. The
engine owns these rules (`qoq generate` runs the engine too)."""

from __future__ import annotations

from qoq.model.llama import LlamaModel
from qoq.sampling import SamplingParams


def stop_token_ids(model: LlamaModel, tokenizer, params: SamplingParams) -> set[int]:
    """The request's stop tokens, plus the model's and tokenizer's EOS unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
    return ids


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
