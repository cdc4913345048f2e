"""Every error the server answers, in OpenAI's shape, and the request body limit.

Clients (the `openai` package among them) read `{"error": {"message", "type", "param", "code"}}`
from any 4xx/5xx, so FastAPI's own answers (`{"detail": ...}` for a 404 route, a 405, a body it
cannot parse) and unexpected exceptions are rewritten into it too.
"""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "server_overloaded"}


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after_s: int | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


def _validation_error(err: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of pydantic's complaints about a body."""
    parts, param = [], None
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        param = param or where or None
        if e.get("type") == "extra_forbidden":
            parts.append(f"{where}: qoq does not support this field; leave it out")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
        return error_response(err.status, err.message, err.param, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError):
        return error_response(400, *_validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid JSON (or not UTF-8)"
        return error_response(err.status_code, message, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception):
        log.exception("unhandled error in a request")
        return error_response(500, f"internal server error ({type(err).__name__}); see the server log")


class ApiKeyAuth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>` (401 without)."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("a valid API key is required: send 'Authorization: Bearer <key>' with the key "
                   "qoq serve was started with (--api-key)")
        await error_response(401, message, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, announced (Content-Length) or
    streamed (chunked), before any of it is parsed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, send)
        received, refused = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal refused
            if received <= self.max_bytes:
                await send(message)
            elif message["type"] == "http.response.start" and not refused:
                # FastAPI turns an error while reading the body into its own 400: answer 413 instead.
                refused = True
                await self._refuse(scope, send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not refused:
                await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        message = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                   "(qoq serve --max-request-bytes)")
        await error_response(413, message, headers={"Connection": "close"})(scope, None, send)
