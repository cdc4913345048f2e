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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from qoq.server.async_engine import AsyncEngine, EngineError, QueueFull, RequestStream
from qoq.server.engine_loop import Delta
from qoq.server.metrics import render_metrics
from qoq.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
    error_body,
    new_id,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}"
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _tokenize(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return [int(t) for t in prompt]


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _chunk_template(obj: dict, key: str) -> str:
    """The JSON of `obj` up to its `key` field's value, which `obj` holds as the placeholder 0:
    a chunk is then template + json.dumps(value) + the rest, no object built per chunk."""
    text = json.dumps({**obj, key: 0}, separators=(",", ":"))
    return text.split(f'"{key}":0', 1)[0] + f'"{key}":'


def build_app(engine: AsyncEngine, model_name: str, retry_after_s: int = 1) -> FastAPI:
    limits = engine.limits
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="qoq", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
        return JSONResponse(error_body(err.message, err.status), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError):
        return JSONResponse(error_body(_validation_message(err), 400), status_code=400)

    def check_model(req: SamplingFields) -> None:
        if req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves {model_name!r}")

    def params_for(req: SamplingFields, prompt_ids: list[int], max_tokens: int | None, default: int):
        if len(prompt_ids) >= limits.max_model_len:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this model's maximum context "
                                f"length is {limits.max_model_len} tokens (prompt + output)")
        try:
            return req.sampling_params(max_tokens if max_tokens is not None else default)
        except ValueError as err:
            raise ApiError(400, str(err)) from err

    def submit(prompt_ids, params, request_id) -> RequestStream:
        if not engine.alive:
            raise ApiError(503, "the engine is not running")
        try:
            return engine.add(prompt_ids, params, request_id)
        except ValueError as err:
            raise ApiError(400, str(err)) from err
        except QueueFull as err:
            raise ApiError(503, str(err), retry_after_s=retry_after_s) from err

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine.stats(), model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=model_name, max_model_len=limits.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "qoq takes one prompt per request; send a string, not a list of strings")
            prompt = prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise ApiError(400, "the prompt is empty: it needs at least one token")
        try:
            prompt_ids = _tokenize(tokenizer, prompt)
        except (TypeError, ValueError) as err:
            raise ApiError(400, f"cannot tokenize the prompt: {err}") from err
        params = params_for(req, prompt_ids, req.max_tokens, default=16)  # OpenAI's default for completions
        request_id = new_id("cmpl")
        stream = submit(prompt_ids, params, request_id)
        if req.stream:
            return _sse(completion_chunks(stream, request_id, req.include_usage), stream)
        out = await _collect(stream, raw)
        if out is None:
            return Response(status_code=499)
        text = (prompt if isinstance(prompt, str) else "") + out.text if req.echo else out.text
        return CompletionResponse(id=request_id, model=model_name, usage=_usage(out),
                                  choices=[CompletionChoice(text=text, finish_reason=out.finish_reason)])

    async def completion_chunks(stream: RequestStream, request_id: str, include_usage: bool):
        text_head = _chunk_template(CompletionResponse(id=request_id, model=model_name, choices=[]).model_dump(),
                                    "choices") + '[{"index":0,"text":'
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
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        try:
            prompt_ids = _chat_ids(tokenizer, messages)
        except Exception as err:  # noqa: BLE001 - templates raise their own errors on bad roles/order
            raise ApiError(400, f"cannot apply the chat template to these messages: {err}") from err
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = params_for(req, prompt_ids, max_tokens, default=limits.max_model_len - len(prompt_ids))
        request_id = new_id("chatcmpl")
        stream = submit(prompt_ids, params, request_id)
        if req.stream:
            return _sse(chat_chunks(stream, request_id, req.include_usage), stream)
        out = await _collect(stream, raw)
        if out is None:
            return Response(status_code=499)
        return ChatCompletionResponse(id=request_id, model=model_name, usage=_usage(out), choices=[
            ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)])

    async def chat_chunks(stream: RequestStream, request_id: str, include_usage: bool):
        def chunk(delta, finish_reason=None):
            return ChatCompletionChunk(id=request_id, model=model_name, choices=[
                ChatChunkChoice(delta=delta, finish_reason=finish_reason)]).model_dump_json()

        content_head = _chunk_template(ChatCompletionChunk(id=request_id, model=model_name, choices=[]).model_dump(),
                                       "choices") + '[{"index":0,"delta":{"content":'
        yield chunk(DeltaMessage(role="assistant", content=""))
        while True:
            deltas = await stream.next()
            last = deltas[-1]
            text = "".join(d.text for d in deltas) if len(deltas) > 1 else last.text
            if text:
                yield f'{content_head}{json.dumps(text)}}},"finish_reason":null}}],"usage":null}}'
            if last.finished:
                yield chunk(DeltaMessage(), last.finish_reason)
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
