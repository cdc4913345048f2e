"""Structured output at the edge: a request's response_format / guided_regex / guided_grammar (or
its tool_choice, server/tools.py) -> an llguidance grammar, compiled here on a worker thread (a
complex schema takes up to a second; cached by its text) so that a bad one is a 400 naming its
field before the request reaches the engine. The engine compiles it again for its own matchers
(engine/guided.py, cached there too)."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

from qoq.engine.guided import GrammarError, Guidance, build_grammar, make_tokenizer
from qoq.server.errors import ApiError
from qoq.server.protocol import SamplingFields

ANY_JSON_OBJECT = {"type": "object"}


def request_grammar(req: SamplingFields) -> tuple[str, str] | None:
    """(llguidance grammar, the field it came from), or None for free text. ApiError 400 on a
    malformed spec or more than one constraint."""
    found: list[tuple[str, str, object]] = []  # (field, kind, spec)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json_schema", ANY_JSON_OBJECT))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format of type json_schema needs json_schema.schema", param="response_format")
        found.append(("response_format", "json_schema", fmt.json_schema.schema_))
    if req.guided_regex is not None:
        found.append(("guided_regex", "regex", req.guided_regex))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", "gbnf", req.guided_grammar))  # llguidance reads Lark or GBNF
    if len(found) > 1:
        raise ApiError(400, f"give at most one output constraint, got {', '.join(f for f, _, _ in found)}",
                       param=found[1][0])
    if not found:
        return None
    return compile_spec(*found[0]), found[0][0]


def compile_spec(param: str, kind: str, spec) -> str:
    try:
        return build_grammar(kind, spec)
    except GrammarError as err:
        raise ApiError(400, f"{param}: {err}", param=param) from err


class GrammarChecker:
    """Compiles grammars off the event loop against the served tokenizer (built on first use)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer  # the event loop's copy: deep-copied on the worker
        self._vocab_size = vocab_size
        self._guidance: Guidance | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qoq-grammar")

    def _check(self, grammar: str) -> None:
        if self._guidance is None:
            tok = copy.deepcopy(self._tokenizer)
            eos = [tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else []
            self._guidance = Guidance(make_tokenizer(tok, self._vocab_size, eos))
        self._guidance.check(grammar)

    async def check(self, grammar: str, param: str) -> None:
        """ApiError 400 naming `param` when the grammar does not compile."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._check, grammar)
        except GrammarError as err:
            raise ApiError(400, f"{param}: {err}", param=param) from err

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
