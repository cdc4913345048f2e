"""Tokenization off the event loop: a long prompt takes seconds to tokenize, and on the loop it
would stall /health and every stream meanwhile.

HF fast tokenizers release the GIL while they encode but are not safe to share between threads,
so each worker thread holds a copy of its own.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor


class TokenizerPool:
    def __init__(self, tokenizer, num_workers: int = 2) -> None:
        self.tokenizer = tokenizer  # the loop's copy: attributes only (chat_template, ...)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="qoq-tokenize")

    def _own(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def _encode(self, prompt: str) -> list[int]:
        return list(self._own()(prompt)["input_ids"])

    def _chat(self, messages: list[dict]) -> list[int]:
        ids = self._own().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def encode(self, prompt: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, prompt)

    def _decode(self, ids: list[int]) -> str:
        return self._own().decode(ids)

    async def decode(self, ids: list[int]) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._decode, ids)

    async def chat(self, messages: list[dict]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._chat, messages)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
