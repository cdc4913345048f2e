"""Logprob entries (qoq/engine/logprobs.py) in OpenAI's two shapes, and several streams as one.

Token texts are decoded one id at a time on the event loop (short, and cached per server).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE tokens spell their bytes this way."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), decoded once. Only the event loop's thread uses it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_of = _byte_decoder()
        self.get = lru_cache(maxsize=65536)(self._get)

    def _get(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        piece = self.tokenizer.convert_ids_to_tokens(token) if hasattr(self.tokenizer, "convert_ids_to_tokens") else None
        if isinstance(piece, str) and piece and all(ch in self._byte_of for ch in piece):
            raw = [self._byte_of[ch] for ch in piece]  # a byte-level token: its own bytes, part of a character too
        else:
            raw = list(text.encode("utf-8"))
        return text, raw


class CompletionLogprobs:
    """The legacy completions shape, one choice: offsets run on across streamed chunks."""

    def __init__(self, texts: TokenTexts, offset: int = 0) -> None:
        self.texts = texts
        self.offset = offset

    def format(self, entries: list) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            if entry is None:  # the first prompt token: nothing to condition on
                continue
            token, logprob, top = entry
            text = self.texts.get(token)[0]
            top_dict = {self.texts.get(t)[0]: lp for t, lp in top}
            top_dict.setdefault(text, logprob)  # the chosen token is always there (logprobs 0: it alone)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top_dict)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def prompt(self, first_token: int, entries: list) -> dict:
        """Prompt tokens (echo): the first one's logprob and top_logprobs are null."""
        text = self.texts.get(first_token)[0]
        head = {"tokens": [text], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [self.offset]}
        self.offset += len(text)
        return merge_completion_logprobs(head, self.format(entries[1:]))


def merge_completion_logprobs(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(texts: TokenTexts, entries: list) -> dict:
    content = []
    for token, logprob, top in entries:
        text, raw = texts.get(token)
        content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": [
            {"token": texts.get(t)[0], "logprob": lp, "bytes": texts.get(t)[1]} for t, lp in top]})
    return {"content": content}


async def merged(streams):
    """(index, deltas) from several RequestStreams as they come, until each has finished."""
    pending = {asyncio.ensure_future(s.next()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                deltas = task.result()  # EngineError when the engine failed it
                if not deltas[-1].finished:
                    pending[asyncio.ensure_future(streams[i].next())] = i
                yield i, deltas
    finally:
        for task in pending:
            task.cancel()
