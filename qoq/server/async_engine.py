"""The event loop's side of the engine: one stream per request, fed one message per engine step.

The engine runs behind a backend (`engine_loop.EngineProcess` for `qoq serve`, `EngineThread`
for an in-memory model). Each step's message reaches the event loop with one
call_soon_threadsafe, and `_dispatch` appends each request's `Delta` to its stream and wakes its
response task. A response task that wakes late (a slow client, a busy loop) takes every delta
that piled up at once, so it writes one chunk per wake-up, not one per step.

Requests beyond `max_num_seqs + max_queue_len` in flight are refused (`QueueFull`: the server
answers 503 with Retry-After) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from qoq.engine.histogram import Histogram
from qoq.engine.llm_engine import EngineStats
from qoq.sampling import SamplingParams
from qoq.server.engine_loop import Delta, StepMessage

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running this request (the server answers 500)."""


class QueueFull(RuntimeError):
    """Too many requests in flight (the server answers 503)."""


class RequestStream:
    __slots__ = ("request_id", "finished", "_pending", "_waiter")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.finished = False
        self._pending: list[Delta] = []
        self._waiter: asyncio.Future | None = None

    def put(self, delta: Delta) -> None:
        self._pending.append(delta)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> list[Delta]:
        """Every delta since the last call (at least one); EngineError when the engine failed it."""
        while not self._pending:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        deltas, self._pending = self._pending, []
        last = deltas[-1]
        self.finished = last.finished
        if last.error is not None:
            raise EngineError(last.error)
        return deltas


class AsyncEngine:
    def __init__(self, backend, max_num_seqs: int, max_queue_len: int = 4096) -> None:
        self.backend = backend
        self.limits = backend.limits
        self.tokenizer = backend.tokenizer  # the event loop's own copy
        self.max_in_flight = max_num_seqs + max_queue_len
        self._streams: dict[str, RequestStream] = {}
        self._stats = EngineStats(num_pages_total=self.limits.num_pages)
        # Gaps between the engine's step messages as this event loop receives them, while requests
        # are in flight: the engine's step time plus the hand-off, what a stream's tokens wait.
        self.message_gaps = Histogram()
        self._last_message: float | None = None
        self._gone = False
        self._stopping = False
        self.failed = False  # the engine stopped on its own (a device fault): the server should exit
        self.on_failure: Callable[[], None] | None = None  # called on the event loop when it does

    def start(self) -> None:
        """Start delivering the engine's messages to this (running) event loop."""
        loop = asyncio.get_running_loop()

        def on_message(message: StepMessage | None) -> None:
            try:
                loop.call_soon_threadsafe(self._dispatch, message)
            except RuntimeError:  # the loop closed under us (shutdown)
                pass

        self.backend.start(on_message)

    def shutdown(self) -> None:
        self._stopping = True
        self.backend.shutdown()

    @property
    def alive(self) -> bool:
        return self.backend.alive and not self._gone

    def stats(self) -> EngineStats:
        return self._stats  # as of the engine's latest message

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Queue a request: ValueError right away when it can never be served, QueueFull when
        the queue is full."""
        self.limits.check(prompt_ids, params)
        if len(self._streams) >= self.max_in_flight:
            raise QueueFull(f"the server is at capacity ({len(self._streams)} requests in flight); retry later")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self.backend.send(("add", request_id, prompt_ids, params))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.backend.send(("abort", request_id))

    def _dispatch(self, message: StepMessage | None) -> None:
        if message is None:  # the engine (process or thread) is gone
            self._gone = True
            if self._stopping:
                return
            log.critical("the engine stopped; failing %d requests in flight", len(self._streams))
            for request_id, stream in self._streams.items():
                stream.put(Delta(request_id, "", 0, 0, True, "error", "the engine stopped"))
            self._streams.clear()
            self.failed = True
            if self.on_failure is not None:
                self.on_failure()
            return
        self._stats = message.stats
        streams = self._streams
        now = time.perf_counter()
        if self._last_message is not None:
            self.message_gaps.observe(now - self._last_message)
        for delta in message.deltas:
            stream = streams.get(delta.request_id)
            if stream is not None:
                if delta.finished:
                    del streams[delta.request_id]
                stream.put(delta)
        self._last_message = now if streams else None  # idle gaps are not steps
