"""The engine on a background thread, fed through a thread-safe inbox.

The event loop never touches the LLMEngine while it runs: it puts ("add" | "abort") commands in
the inbox, and the engine thread applies them between steps (so new requests join the running
batch at the next step), steps, and hands each RequestOutput to the request's own asyncio.Queue
with call_soon_threadsafe. check_request only reads immutable limits, so the loop may call it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from qoq.engine.llm_engine import EngineStats, LLMEngine
from qoq.engine.sequence import RequestOutput
from qoq.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running this request (the server answers 500)."""


@dataclass
class RequestStream:
    request_id: str
    queue: asyncio.Queue
    finished: bool = False

    async def next(self) -> RequestOutput:
        item = await self.queue.get()
        if isinstance(item, Exception):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qoq-engine", daemon=True)
        self._stats = engine.stats()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # -- called from the event loop ---------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Queue a request (ValueError right away when it can never be served)."""
        self.engine.check_request(prompt_ids, params)
        stream = RequestStream(request_id, asyncio.Queue())
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), stream.queue)
        self._inbox.put(("add", request_id, prompt_ids, params))
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats  # refreshed by the engine thread after every step

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_commands(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(err)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            self._stats = self.engine.stats()
        log.info("engine thread stopped")

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if command is not None:
                    self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._stats = self.engine.stats()

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if self.engine.abort_request(command[1]) is not None:
                log.info("aborted %s (client gone)", command[1])
            return
        _, request_id, prompt_ids, params = command
        with self._lock:
            if request_id not in self._streams:
                return  # the client left before the engine saw the request
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except ValueError as err:
            self._deliver(request_id, err)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        with self._lock:
            target = self._streams.get(request_id)
            finished = isinstance(item, Exception) or item.finished
            if finished:
                self._streams.pop(request_id, None)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the server's loop closed under us (shutdown)
                pass

    def _fail_all(self, err: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, EngineError(f"the engine failed: {type(err).__name__}: {err}"))
