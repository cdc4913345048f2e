"""`qoq serve`: the engine in a process of its own, uvicorn here (or, for an in-memory model such
as the demo's, the engine on a thread and uvicorn on another)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.server.app import build_app
from qoq.server.async_engine import AsyncEngine
from qoq.server.engine_loop import EngineProcess, EngineThread, ModelSpec
from qoq.server.errors import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger(__name__)


def _uvicorn(engine: AsyncEngine, model_name: str | list[str], host: str, port: int, log_level: str,
             max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None) -> uvicorn.Server:
    app = build_app(engine, model_name, max_request_bytes=max_request_bytes, api_key=api_key)
    # backlog: a benchmark opens thousands of connections at once.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=4096,
                                           timeout_keep_alive=30))

    def engine_failed() -> None:  # exit (and be restarted) rather than answer 503 forever
        log.critical("the engine stopped after a device fault; shutting the server down (exit code 1)")
        server.should_exit = True

    engine.on_failure = engine_failed
    return server


def engine_failed(server: uvicorn.Server) -> bool:
    """Whether `server` stopped because its engine did (`qoq serve` then exits with 1)."""
    return server.config.app.state.engine.failed


def make_server(model, tokenizer, model_name: str | list[str], config: EngineConfig, host: str, port: int,
                log_level: str = "info", max_queue_len: int = 4096,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_key: str | None = None) -> uvicorn.Server:
    """A server over a model already in memory: the engine runs on a thread of this process."""
    engine = AsyncEngine(EngineThread(LLMEngine(model, tokenizer, config)), config.max_num_seqs, max_queue_len)
    # The model and engine live as long as the process: keep the cyclic GC from walking them in
    # every full collection (~100 ms at batch 1000) that per-request allocations trigger.
    gc.collect()
    gc.freeze()
    return _uvicorn(engine, model_name, host, port, log_level, max_request_bytes, api_key)


def make_process_server(spec: ModelSpec, model_name: str | list[str], config: EngineConfig, host: str, port: int,
                        log_level: str = "info", max_queue_len: int = 4096,
                        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                        api_key: str | None = None) -> uvicorn.Server:
    """A server whose engine runs in a process of its own (loads the model there; returns once it is up)."""
    engine = AsyncEngine(EngineProcess(spec, config), config.max_num_seqs, max_queue_len)
    gc.collect()
    gc.freeze()
    return _uvicorn(engine, model_name, host, port, log_level, max_request_bytes, api_key)


def default_served_name(model: str, random_config: str | None = None, precision: str = "") -> str:
    """The name clients send: the model's folder (or file) name, never its path, which /v1/models
    and the metric labels would publish; random weights: their config's name."""
    if random_config is not None:
        path = Path(random_config)
        name = path.parent.name if path.name == "config.json" else path.stem
        return f"random-{name}-{precision}"
    path = Path(model)
    if path.name == "config.json":
        path = path.parent
    return (path.stem if path.suffix in (".gguf", ".json") else path.name) or str(model)


def read_chat_template(path: str | None) -> str | None:
    """`qoq serve --chat-template FILE`: a Jinja chat template (e.g. one that renders tools)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"--chat-template: cannot read {path}: {err}") from err
    if not text.strip():
        raise ValueError(f"--chat-template: {path} is empty")
    return text


def check_port_free(host: str, port: int) -> None:
    """ValueError when `host:port` cannot be bound (checked before the model loads, so a busy
    port is reported at once, and before anything says it is serving)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({err})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}; another server may be "
                             "using the port: stop it or pass --port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout_s: float) -> None:
    """Wait until `url`/health answers 200; RuntimeError if the server process `proc` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"qoq serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"qoq serve did not come up in {timeout_s:.0f}s")
        time.sleep(0.5)


class BackgroundServer:
    """A uvicorn server on a thread of this process (the demo; tests run a real process instead)."""

    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.run, name="qoq-uvicorn", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (is the port free?)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
