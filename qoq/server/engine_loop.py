"""The engine's loop, on a process of its own (`qoq serve`) or on a thread (an in-memory model: the demo).

The API server never touches the LLMEngine. It sends commands ("add" | "abort" | "stop"), which the
loop applies between steps, and gets back one `StepMessage` per engine step: a `Delta` for each
request that produced something, and the engine's stats. One message per step (not one per token
or per request) keeps the hand-off cost flat as the batch grows; on a process of its own the
engine's Python never waits for the GIL behind the HTTP server's event loop.
"""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing as mp
import queue
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import EngineStats, LLMEngine
from qoq.engine.parallel import load_model_shard, rank_device
from qoq.engine.sequence import RequestOutput
from qoq.host import keep_freed_memory, set_cpu_threads
from qoq.server.tp import start_engine as start_tp_engine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delta:
    """One request's part of a step: what the HTTP response needs, no token lists."""

    request_id: str
    text: str  # the new text (a non-streaming request: all of it, once finished)
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # the engine failed this request (the server answers 500)
    # Requests that ask for logprobs only (None otherwise: plain requests pickle no more):
    logprobs: list | None = None  # an entry per new token (qoq/engine/logprobs.py)
    prompt_logprobs: list | None = None  # with the first delta
    cumulative_logprob: float | None = None


@dataclass
class StepMessage:
    deltas: list[Delta]
    stats: EngineStats = field(default_factory=EngineStats)


def _delta(out: RequestOutput) -> Delta:
    if out.new_logprobs is None and out.prompt_logprobs is None:
        return Delta(out.request_id, out.new_text, out.num_prompt_tokens, len(out.token_ids), out.finished,
                     out.finish_reason, out.error)
    return Delta(out.request_id, out.new_text, out.num_prompt_tokens, len(out.token_ids), out.finished,
                 out.finish_reason, out.error, out.new_logprobs, out.prompt_logprobs, out.cumulative_logprob)


class EngineLoop:
    """Apply the commands that arrived, run a step, emit its message; block while idle."""

    def __init__(self, engine: LLMEngine, next_command: Callable[[bool], tuple | None],
                 emit: Callable[[StepMessage], None]) -> None:
        self.engine = engine
        self.next_command = next_command  # (block) -> a command, or None when there is none yet
        self.emit = emit
        self._errors: list[Delta] = []  # requests refused by the engine itself, sent with the next message

    def run(self) -> bool:
        """Until "stop" (-> False), or (-> True) until a step raises: the engine isolates a request's failure itself
        (LLMEngine.step), so what reaches here is a device fault or a bug. Then every request in
        flight fails and the loop ends, so the process exits and the server with it (a supervisor
        restarts it) instead of serving from a device in an unknown state."""
        engine = self.engine
        while True:
            applied = self._apply_commands(block=not engine.has_unfinished_requests())
            if applied is None:
                break
            if not engine.has_unfinished_requests():
                if applied or self._errors:  # aborts and refusals show in the stats at once
                    self._send([])
                continue
            try:
                outputs = engine.step()
            except Exception as err:  # noqa: BLE001 - reported to every request, then the loop ends
                log.critical("the engine failed (%s: %s); failing %d requests and stopping", type(err).__name__,
                             err, len(engine.requests), exc_info=True)
                self._fail_all(err)
                return True
            self._send([_delta(out) for out in outputs])
        log.info("engine loop stopped")
        return False

    def _send(self, deltas: list[Delta]) -> None:
        if self._errors:
            deltas, self._errors = self._errors + deltas, []
        self.emit(StepMessage(deltas, self.engine.stats()))

    def _apply_commands(self, block: bool) -> int | None:
        """The number of commands applied, None on "stop"."""
        applied = 0
        command = self.next_command(block)
        while command is not None:
            if command[0] == "stop":
                return None
            self._apply(command)
            applied += 1
            command = self.next_command(False)
        return applied

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if self.engine.abort_request(command[1]) is not None:
                log.info("aborted %s (client gone)", command[1])
            return
        _, request_id, prompt_ids, params = command
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except ValueError as err:
            self._errors.append(Delta(request_id, "", len(prompt_ids), 0, True, "error", str(err)))

    def _fail_all(self, err: Exception) -> None:
        outputs = [self.engine.fail_request(seq, err) for seq in list(self.engine.requests.values())]
        self._send([_delta(out) for out in outputs])


class EngineThread:
    """The loop on a thread of this process, over an engine built here (the demo's in-memory model)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.limits = engine.limits
        self.tokenizer = copy.deepcopy(engine.tokenizer)  # the event loop's own: HF tokenizers are not thread-safe
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, on_message: Callable[[StepMessage], None]) -> None:
        def next_command(block: bool):
            try:
                return self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return None

        loop = EngineLoop(self.engine, next_command, on_message)

        def run() -> None:
            loop.run()
            on_message(None)

        self._thread = threading.Thread(target=run, name="qoq-engine", daemon=True)
        self._thread.start()

    def send(self, command: tuple) -> None:
        self._inbox.put(command)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class ModelSpec:
    """What the engine process loads: a model argument of the loader, or random weights of a config."""

    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    random_config: str | None = None  # a config of qoq/configs or a config.json: random weights (benchmarks)
    precision: str = "w16a16kv16"  # of the random weights
    log_level: str = "info"
    threads: int | None = None  # torch's CPU threads (qoq.host.set_cpu_threads; None: one per idle CPU)
    tensor_parallel_size: int = 1  # > 1: this process is rank 0 of a group (server/tp.py)
    chat_template: str | None = None  # replaces the tokenizer's (qoq serve --chat-template FILE)

    def load(self, tp=None):
        """(model, tokenizer): the whole model, or with a group `tp` this rank's shard (a qoq
        checkpoint read a layer at a time; random weights drawn a layer at a time and sliced, the
        same model for every group size). Every rank of `qoq serve --tensor-parallel-size` runs it."""
        set_cpu_threads(self.threads)  # a worker rank is a fresh process
        model, tokenizer = self._load(tp)
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        return model, tokenizer

    def _load(self, tp):
        import torch

        dtype = getattr(torch, self.dtype)
        if self.random_config is None:
            if tp is not None:
                return load_model_shard(self.model, dtype, self.device, tp)
            from qoq.model.loader import load_model

            return load_model(self.model, dtype=dtype, device=self.device)
        from qoq.bench.random_model import bench_quant_config, bundled_config, random_model
        from qoq.bench.synthetic_tokenizer import synthetic_tokenizer

        config = bundled_config(self.random_config)
        device = self.device if tp is None else rank_device(self.device)
        model = random_model(config, bench_quant_config(self.precision), device, dtype, tp=tp)
        return model, synthetic_tokenizer(config.vocab_size, config.eos_token_ids[0] if config.eos_token_ids else None)


def _engine_process_main(spec: ModelSpec, config: EngineConfig, commands, outputs) -> None:
    # Ctrl-C reaches every process of the terminal's group: the server process handles it and
    # stops this one (no second traceback from here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(), format="%(levelname)s %(name)s (engine): %(message)s")
    keep_freed_memory()
    set_cpu_threads(spec.threads)
    try:
        if spec.tensor_parallel_size > 1:
            engine = start_tp_engine(spec, config)
            tokenizer = engine.tokenizer
        else:
            model, tokenizer = spec.load()
            engine = LLMEngine(model, tokenizer, config)
    except Exception as err:
        outputs.put(("failed", f"{type(err).__name__}: {err}"))
        raise
    # The model and engine live as long as the process: keep the cyclic GC from walking them in
    # every full collection (~100 ms at batch 1000) that per-step allocations trigger.
    gc.collect()
    gc.freeze()
    outputs.put(("ready", engine.limits, tokenizer))
    parent = mp.parent_process()

    def next_command(block: bool):
        while True:
            try:
                return commands.get(timeout=1.0) if block else commands.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                if parent is not None and not parent.is_alive():
                    return ("stop",)

    failed = EngineLoop(engine, next_command, outputs.put).run()
    if spec.tensor_parallel_size > 1:
        engine.close(kill=failed)
    outputs.put(None)
    if failed:
        raise SystemExit(1)


class EngineStartError(RuntimeError):
    """The engine process exited before its engine was up (qoq serve reports it and exits 1)."""


class EngineProcess:
    """The loop in a process of its own (spawned: CUDA is initialised there only). The constructor
    returns once the model is loaded; a reader thread hands each step's message to `on_message`."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, start_timeout_s: float = 1800) -> None:
        ctx = mp.get_context("spawn")
        self._commands = ctx.Queue()
        self._outputs = ctx.Queue()
        self._process = ctx.Process(target=_engine_process_main, name="qoq-engine", daemon=True,
                                    args=(spec, config, self._commands, self._outputs))
        self._process.start()
        self._reader: threading.Thread | None = None
        self._stopped = False
        ready = self._get(start_timeout_s)
        if ready is None or ready[0] != "ready":
            self._process.join(timeout=5)
            detail = ready[1] if ready else f"exit code {self._process.exitcode}"
            raise EngineStartError(f"the engine process failed to start ({detail}); see its log above")
        _, self.limits, self.tokenizer = ready

    def _get(self, timeout_s: float):
        """The next message; None once the process is gone (or after timeout_s)."""
        waited = 0.0
        while waited < timeout_s:
            try:
                return self._outputs.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                if not self._process.is_alive():
                    return None
        return None

    def start(self, on_message: Callable[[StepMessage | None], None]) -> None:
        """on_message(None) says the process is gone."""

        def read() -> None:
            while True:
                message = self._get(float("inf"))
                on_message(message)
                if message is None:
                    return

        self._reader = threading.Thread(target=read, name="qoq-engine-reader", daemon=True)
        self._reader.start()

    def send(self, command: tuple) -> None:
        self._commands.put(command)

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and not self._stopped

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._process.join(timeout=15)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
