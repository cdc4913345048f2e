"""The OpenAI-compatible HTTP server: FastAPI routes over the AsyncEngine.

Every request is checked completely (model name, JSON, sampling values, prompt length) before it
reaches the engine, so a bad request gets a 4xx and never touches the running batch. A client
that goes away (stream closed, or non-streaming connection dropped) has its request aborted,
which frees its KV pages at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from qoq.server.async_engine import AsyncEngine, EngineError, QueueFull, RequestStream
from qoq.server.engine_loop import Delta
from qoq import __version__
from qoq.sampling import SEED_RANGE
from qoq.server.errors import (
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    ApiKeyAuth,
    BodyLimit,
    error_body,
    install_error_handlers,
)
from qoq.server.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs, merge_completion_logprobs, merged
from qoq.server.metrics import render_metrics
from qoq.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    DeltaToolCall,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    new_id,
)
from qoq.server.structured import GrammarChecker, compile_spec, request_grammar
from qoq.server.tokenizer_pool import TokenizerPool
from qoq.server.tools import ToolStream, active_tools, message_dicts, parse_tool_calls, tool_choice_schema, tool_dicts

log = logging.getLogger(__name__)


def _chunk_template(obj: dict, key: str) -> str:
    """The JSON of `obj` up to its `key` field's value, which `obj` holds as the placeholder 0:
    a chunk is then template + json.dumps(value) + the rest, no object built per chunk."""
    text = json.dumps({**obj, key: 0}, separators=(",", ":"))
    return text.split(f'"{key}":0', 1)[0] + f'"{key}":'


def build_app(engine: AsyncEngine, model_name: str | list[str], retry_after_s: int = 1,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None) -> FastAPI:
    """The routes over `engine`. `model_name`: the name clients send, or a list of names (the
    first is the one responses and metrics carry). `api_key`: required as a Bearer token on every
    route but /health."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    if not names:
        raise ValueError("the server needs at least one model name")
    model_name = names[0]
    limits = engine.limits
    tokenizers = TokenizerPool(engine.tokenizer)
    grammars = GrammarChecker(engine.tokenizer, limits.vocab_size)
    token_texts = TokenTexts(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.shutdown()
        tokenizers.shutdown()
        grammars.shutdown()

    app = FastAPI(title="qoq", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)  # added last: runs first
    model_cards = {name: ModelCard(id=name, max_model_len=limits.max_model_len) for name in names}
    served = ", ".join(repr(n) for n in names)

    def check_model(req: SamplingFields | TokenizeRequest | DetokenizeRequest) -> None:
        if req.model not in model_cards and not (req.model is None and not isinstance(req, SamplingFields)):
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves {served}", param="model")

    def params_for(req: SamplingFields, prompt_ids: list[int], max_tokens: int | None, default: int):
        if len(prompt_ids) >= limits.max_model_len:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this model's maximum context "
                                f"length is {limits.max_model_len} tokens (prompt + output)")
        try:
            return req.sampling_params(max_tokens if max_tokens is not None else default)
        except ValueError as err:
            raise ApiError(400, str(err), param=getattr(err, "param", None)) from err

    async def constrain(params, spec: tuple[str, str] | None) -> None:
        """Structured output: check (compile, off the loop) the grammar and put it on the params."""
        if spec is not None:
            await grammars.check(*spec)
            params.grammar = spec[0]

    def submit(prompt_ids, params, request_id) -> RequestStream:
        if not engine.alive:
            raise ApiError(503, "the engine is not running")
        try:
            return engine.add(prompt_ids, params, request_id)
        except ValueError as err:
            raise ApiError(400, str(err), param=getattr(err, "param", None)) from err
        except QueueFull as err:
            raise ApiError(503, str(err), retry_after_s=retry_after_s) from err

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse(error_body("the engine stopped", 503), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine.stats(), model_name, engine.message_gaps),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=list(model_cards.values()))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in model_cards:
            raise ApiError(404, f"the model {model_id!r} does not exist: this server serves {served}", param="model")
        return model_cards[model_id]

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either a prompt or messages", param="prompt")
        try:
            if req.prompt is not None:
                ids = await tokenizers.encode(req.prompt, req.add_special_tokens)
            else:
                ids = await tokenizers.chat([{"role": m.role, "content": m.text()} for m in req.messages])
        except Exception as err:  # noqa: BLE001 - tokenizers and templates raise their own errors
            raise ApiError(400, f"cannot tokenize: {err}", param="messages" if req.messages else "prompt") from err
        return TokenizeResponse(count=len(ids), max_model_len=limits.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req)
        bad = next((t for t in req.tokens if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside this model's vocabulary [0, {limits.vocab_size})",
                           param="tokens")
        return DetokenizeResponse(prompt=await tokenizers.decode(req.tokens))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req)
        prompts = req.prompt
        if isinstance(prompts, str) or not prompts or isinstance(prompts[0], int):
            prompts = [prompts]
        all_ids = []
        for prompt in prompts:
            if isinstance(prompt, str) and not prompt:
                raise ApiError(400, "the prompt is empty: it needs at least one token", param="prompt")
            try:
                all_ids.append(await tokenizers.encode(prompt) if isinstance(prompt, str) else prompt)
            except Exception as err:  # noqa: BLE001 - tokenizers raise their own error types
                raise ApiError(400, f"cannot tokenize the prompt: {err}", param="prompt") from err
        # OpenAI's default max_tokens for completions is 16.
        all_params = [params_for(req, ids, req.max_tokens, default=16) for ids in all_ids]
        spec = request_grammar(req)
        for params in all_params:
            await constrain(params, spec)
        request_id = new_id("cmpl")
        echoes = [""] * len(prompts)
        if req.echo:  # a token-id prompt is echoed as its text
            echoes = [p if isinstance(p, str) else await tokenizers.decode(p) for p in prompts]
        if len(prompts) > 1 or req.num_choices > 1 or all_params[0].logprobs is not None:
            return await choices_response(req, raw, request_id, all_ids, all_params, echoes)
        prompt_ids, params, echo = all_ids[0], all_params[0], echoes[0]
        stream = submit(prompt_ids, params, request_id)
        if req.stream:
            return _sse(completion_chunks(stream, request_id, req.include_usage, echo), stream)
        out = await _collect(stream, raw)
        if out is None:
            return Response(status_code=499)
        text = echo + out.text
        return CompletionResponse(id=request_id, model=model_name, usage=_usage(out),
                                  choices=[CompletionChoice(text=text, finish_reason=out.finish_reason)])

    async def completion_chunks(stream: RequestStream, request_id: str, include_usage: bool, echo: str):
        text_head = _chunk_template(CompletionResponse(id=request_id, model=model_name, choices=[]).model_dump(),
                                    "choices") + '[{"index":0,"text":'
        if echo:
            yield f'{text_head}{json.dumps(echo)},"finish_reason":null,"logprobs":null}}],"usage":null}}'
        while True:
            deltas = await stream.next()
            last = deltas[-1]
            text = "".join(d.text for d in deltas) if len(deltas) > 1 else last.text
            if text or last.finished:
                reason = json.dumps(last.finish_reason)
                yield f'{text_head}{json.dumps(text)},"finish_reason":{reason},"logprobs":null}}],"usage":null}}'
            if last.finished:
                if include_usage:
                    yield CompletionResponse(id=request_id, model=model_name, choices=[],
                                             usage=_usage(last)).model_dump_json()
                return

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_model(req)
        messages = message_dicts(req.messages)
        if not getattr(tokenizers.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        tools = active_tools(req, tokenizers.tokenizer)  # server/tools.py
        try:
            prompt_ids = await tokenizers.chat(messages, tool_dicts(tools) if tools else None)
        except Exception as err:  # noqa: BLE001 - templates raise their own errors on bad roles/order
            raise ApiError(400, f"cannot apply the chat template to these messages: {err}", param="messages") from err
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = params_for(req, prompt_ids, max_tokens, default=limits.max_model_len - len(prompt_ids))
        spec = request_grammar(req)
        schema = tool_choice_schema(req, tools) if tools else None
        if schema is not None:  # tool_choice "required" or a named function: the calls always parse
            if spec is not None:
                raise ApiError(400, f"tool_choice {req.tool_choice!r} cannot be combined with {spec[1]}",
                               param="tool_choice")
            spec = compile_spec("tools", "json_schema", schema), "tools"
        await constrain(params, spec)
        request_id = new_id("chatcmpl")
        if req.num_choices > 1 or params.logprobs is not None:
            return await choices_response(req, raw, request_id, [prompt_ids], [params], None, bool(tools))
        stream = submit(prompt_ids, params, request_id)
        if req.stream:
            return _sse(chat_chunks(stream, request_id, req.include_usage, bool(tools)), stream)
        out = await _collect(stream, raw)
        if out is None:
            return Response(status_code=499)
        message, reason = _assistant_message(out, tools)
        return ChatCompletionResponse(id=request_id, model=model_name, usage=_usage(out), choices=[
            ChatChoice(message=message, finish_reason=reason)])

    async def chat_chunks(stream: RequestStream, request_id: str, include_usage: bool, tools: bool = False):
        def chunk(delta, finish_reason=None):
            return ChatCompletionChunk(id=request_id, model=model_name, choices=[
                ChatChunkChoice(delta=delta, finish_reason=finish_reason)]).model_dump_json()

        content_head = _chunk_template(ChatCompletionChunk(id=request_id, model=model_name, choices=[]).model_dump(),
                                       "choices") + '[{"index":0,"delta":{"content":'
        yield chunk(DeltaMessage(role="assistant", content=""))
        held = ToolStream() if tools else None  # tool calls are sent whole, at the end (server/tools.py)
        while True:
            deltas = await stream.next()
            last = deltas[-1]
            text = "".join(d.text for d in deltas) if len(deltas) > 1 else last.text
            if held is not None:
                text = held.feed(text)
            if text:
                yield f'{content_head}{json.dumps(text)}}},"finish_reason":null}}],"usage":null}}'
            if last.finished:
                reason = last.finish_reason
                if held is not None:
                    rest, calls = held.finish()
                    if rest:
                        yield f'{content_head}{json.dumps(rest)}}},"finish_reason":null}}],"usage":null}}'
                    if calls:
                        yield chunk(DeltaMessage(tool_calls=[DeltaToolCall(index=i, **c.model_dump())
                                                             for i, c in enumerate(calls)]))
                        reason = "tool_calls" if reason == "stop" else reason
                yield chunk(DeltaMessage(), reason)
                if include_usage:
                    yield ChatCompletionChunk(id=request_id, model=model_name, choices=[],
                                              usage=_usage(last)).model_dump_json()
                return

    def _sse(chunks, stream: RequestStream | list[RequestStream]) -> StreamingResponse:
        streams = stream if isinstance(stream, list) else [stream]

        async def body():
            try:
                async for data in chunks:
                    yield f"data: {data}\n\n".encode()
                yield b"data: [DONE]\n\n"
            except EngineError as err:
                yield f"data: {json.dumps(error_body(str(err), 500))}\n\n".encode()
            finally:  # runs on client disconnect too (the response task is cancelled)
                for s in streams:
                    if not s.finished:
                        engine.abort(s.request_id)

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _collect(stream: RequestStream, raw: Request) -> Delta | None:
        """The final delta (all the text), or None when the client disconnected first (request aborted)."""
        try:
            while True:
                task = asyncio.ensure_future(stream.next())
                while not task.done():
                    await asyncio.wait({task}, timeout=0.5)
                    if not task.done() and await raw.is_disconnected():
                        task.cancel()
                        return None
                try:
                    deltas = task.result()
                except EngineError as err:
                    raise ApiError(500, str(err)) from err
                if deltas[-1].finished:
                    return deltas[-1]
        finally:
            if not stream.finished:
                engine.abort(stream.request_id)

    # -- several choices (n, best_of, a list of prompts) or logprobs: the general path ------------
    async def choices_response(req: SamplingFields, raw: Request, request_id: str, all_ids, all_params, echoes,
                               tools: bool = False):
        """Each prompt runs as num_choices sequences (request ids `<id>-<prompt>-<choice>`),
        submitted one after the other, so the first one's prompt pages are keyed by the time its
        siblings are admitted and they start past them (block_manager.py's prefix cache).
        Choice index = prompt index * n + choice. echoes None: a chat request; tools: parse each
        choice's tool calls."""
        k = req.num_choices
        want_logprobs = all_params[0].logprobs is not None
        streams: list[RequestStream] = []
        try:
            for p, (ids, params) in enumerate(zip(all_ids, all_params)):
                for c in range(k):
                    streams.append(submit(ids, _choice_params(params, c, want_logprobs or k > req.n, req.stream),
                                          f"{request_id}-{p}-{c}"))
        except BaseException:
            for s in streams:
                engine.abort(s.request_id)
            raise
        texts = [e for e in (echoes or [""] * len(all_ids)) for _ in range(k)]
        first_ids = [ids[0] for ids in all_ids for _ in range(k)]
        if req.stream:
            if echoes is None:
                return _sse(chat_choice_chunks(streams, request_id, req.include_usage, want_logprobs, tools), streams)
            return _sse(completion_choice_chunks(streams, request_id, req.include_usage, want_logprobs, texts,
                                                 first_ids, len(all_ids)), streams)
        outs: list[Delta] = []
        try:
            for s in streams:
                out = await _collect(s, raw)
                if out is None:
                    return Response(status_code=499)
                outs.append(out)
        finally:
            for s in streams:
                if not s.finished:
                    engine.abort(s.request_id)
        usage = Usage(prompt_tokens=sum(map(len, all_ids)), completion_tokens=sum(o.num_output_tokens for o in outs),
                      total_tokens=0)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        choices = []
        for p in range(len(all_ids)):
            group = list(range(p * k, (p + 1) * k))
            if k > req.n:  # best_of: the n with the highest cumulative logprob
                group = sorted(group, key=lambda i: -outs[i].cumulative_logprob)[: req.n]
            for j, i in enumerate(group):
                out = outs[i]
                if echoes is None:
                    lp = chat_logprobs(token_texts, out.logprobs or []) if want_logprobs else None
                    message, reason = _assistant_message(out, tools)
                    choices.append(ChatChoice(index=p * req.n + j, message=message, finish_reason=reason, logprobs=lp))
                    continue
                lp = None
                if want_logprobs:
                    lp = _completion_logprobs(outs[p * k].prompt_logprobs, first_ids[i], texts[i], out.logprobs)
                choices.append(CompletionChoice(index=p * req.n + j, text=texts[i] + out.text,
                                                finish_reason=out.finish_reason, logprobs=lp))
        if echoes is None:
            return ChatCompletionResponse(id=request_id, model=model_name, usage=usage, choices=choices)
        return CompletionResponse(id=request_id, model=model_name, usage=usage, choices=choices)

    def _completion_logprobs(prompt_entries, first_id: int, echo: str, entries) -> dict:
        fmt = CompletionLogprobs(token_texts)
        head = fmt.prompt(first_id, prompt_entries) if echo and prompt_entries else None
        fmt.offset = len(echo)
        body = fmt.format(entries or [])
        return merge_completion_logprobs(head, body) if head else body

    async def completion_choice_chunks(streams, request_id, include_usage, want_logprobs, texts, first_ids,
                                       num_prompts):
        head = CompletionResponse(id=request_id, model=model_name, choices=[]).model_dump()
        fmts = [CompletionLogprobs(token_texts) for _ in streams]
        started = [False] * len(streams)
        last: list[Delta | None] = [None] * len(streams)
        async for i, deltas in merged(streams):
            text = "".join(d.text for d in deltas)
            entries = [e for d in deltas for e in d.logprobs or []]
            lp = prompt_lp = None
            if not started[i]:  # the echo (and its prompt logprobs) go in front of the first text
                started[i] = True
                if want_logprobs and texts[i] and deltas[0].prompt_logprobs:
                    prompt_lp = CompletionLogprobs(token_texts).prompt(first_ids[i], deltas[0].prompt_logprobs)
                fmts[i].offset = len(texts[i])
                text = texts[i] + text
            if want_logprobs:
                lp = fmts[i].format(entries)
                lp = merge_completion_logprobs(prompt_lp, lp) if prompt_lp else lp
            last[i] = deltas[-1]
            if text or deltas[-1].finished or lp and lp["tokens"]:
                choice = CompletionChoice(index=i, text=text, finish_reason=deltas[-1].finish_reason, logprobs=lp)
                yield CompletionResponse(**{**head, "choices": [choice]}).model_dump_json()
        if include_usage:
            yield CompletionResponse(**{**head, "choices": [], "usage": _usage_of(last, num_prompts)}).model_dump_json()

    async def chat_choice_chunks(streams, request_id, include_usage, want_logprobs, tools: bool = False):
        def chunk(choices, usage=None):
            return ChatCompletionChunk(id=request_id, model=model_name, choices=choices, usage=usage).model_dump_json()

        for i in range(len(streams)):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        last: list[Delta | None] = [None] * len(streams)
        held = [ToolStream() for _ in streams] if tools else None  # each choice's calls go out whole, at its end
        async for i, deltas in merged(streams):
            text = "".join(d.text for d in deltas)
            if held is not None:
                text = held[i].feed(text)
            entries = [e for d in deltas for e in d.logprobs or []]
            last[i] = deltas[-1]
            if text or entries:
                lp = chat_logprobs(token_texts, entries) if want_logprobs else None
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=text), logprobs=lp)])
            if deltas[-1].finished:
                reason = deltas[-1].finish_reason
                if held is not None:
                    rest, calls = held[i].finish()
                    if rest:
                        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=rest))])
                    if calls:
                        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(tool_calls=[
                            DeltaToolCall(index=n, **c.model_dump()) for n, c in enumerate(calls)]))])
                        reason = "tool_calls" if reason == "stop" else reason
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=reason)])
        if include_usage:
            yield chunk([], _usage_of(last, 1))

    return app


def _assistant_message(out: Delta, tools: bool) -> tuple[AssistantMessage, str | None]:
    """A finished chat choice's message and finish reason (its tool calls parsed when tools were given)."""
    if tools:
        content, calls = parse_tool_calls(out.text)
        if calls:
            return AssistantMessage(content=content, tool_calls=calls), \
                "tool_calls" if out.finish_reason == "stop" else out.finish_reason
    return AssistantMessage(content=out.text), out.finish_reason


def _choice_params(params, choice: int, logprobs: bool, stream: bool):
    """Choice `choice` of a request: a seed of its own (reproducible, different per choice), the
    prompt's logprobs on the first only (streamed: on each, whose first chunk carries them; they
    need the whole prompt computed, no cached prefix), and logprobs when best_of ranks by them."""
    changes = {}
    if choice and params.seed is not None:
        changes["seed"] = (params.seed + choice) % (SEED_RANGE[1] + 1)
    if choice and params.prompt_logprobs is not None and not stream:
        changes["prompt_logprobs"] = None
    if logprobs and params.logprobs is None:
        changes["logprobs"] = 0
    return dataclasses.replace(params, **changes) if changes else params


def _usage_of(last: list, num_prompts: int) -> Usage:
    k = len(last) // num_prompts
    prompt = sum(last[p * k].num_prompt_tokens for p in range(num_prompts))
    completion = sum(d.num_output_tokens for d in last)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _usage(out: Delta) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                 total_tokens=out.num_prompt_tokens + out.num_output_tokens)
