"""The OpenAI-compatible HTTP server: FastAPI routes over the AsyncEngine.

Every request is checked completely (model name, JSON, sampling values, prompt length) before it
reaches the engine, so a bad request gets a 4xx and never touches the running batch. A client
that goes away (stream closed, or non-streaming connection dropped) has its request aborted,
which frees its KV pages at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from qoq.server.async_engine import AsyncEngine, EngineError, QueueFull, RequestStream
from qoq.server.engine_loop import Delta
from qoq import __version__
from qoq.server.errors import (
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    ApiKeyAuth,
    BodyLimit,
    error_body,
    install_error_handlers,
)
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
        return PlainTextResponse(render_metrics(engine.stats(), model_name),
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
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "qoq takes one prompt per request; send a string, not a list of strings")
            prompt = prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise ApiError(400, "the prompt is empty: it needs at least one token", param="prompt")
        try:
            prompt_ids = await tokenizers.encode(prompt) if isinstance(prompt, str) else prompt
        except Exception as err:  # noqa: BLE001 - tokenizers raise their own error types
            raise ApiError(400, f"cannot tokenize the prompt: {err}", param="prompt") from err
        params = params_for(req, prompt_ids, req.max_tokens, default=16)  # OpenAI's default for completions
        await constrain(params, request_grammar(req))
        request_id = new_id("cmpl")
        stream = submit(prompt_ids, params, request_id)
        echo = prompt if req.echo and isinstance(prompt, str) else ""
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
        stream = submit(prompt_ids, params, request_id)
        if req.stream:
            return _sse(chat_chunks(stream, request_id, req.include_usage, bool(tools)), stream)
        out = await _collect(stream, raw)
        if out is None:
            return Response(status_code=499)
        message, reason = AssistantMessage(content=out.text), out.finish_reason
        if tools:
            content, calls = parse_tool_calls(out.text)
            if calls:
                message = AssistantMessage(content=content, tool_calls=calls)
                reason = "tool_calls" if reason == "stop" else reason
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

    def _sse(chunks, stream: RequestStream) -> StreamingResponse:
        async def body():
            try:
                async for data in chunks:
                    yield f"data: {data}\n\n".encode()
                yield b"data: [DONE]\n\n"
            except EngineError as err:
                yield f"data: {json.dumps(error_body(str(err), 500))}\n\n".encode()
            finally:  # runs on client disconnect too (the response task is cancelled)
                if not stream.finished:
                    engine.abort(stream.request_id)

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

    return app


def _usage(out: Delta) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                 total_tokens=out.num_prompt_tokens + out.num_output_tokens)
