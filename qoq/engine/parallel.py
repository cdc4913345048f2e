"""The engine over a tensor-parallel group: every rank runs the same LLMEngine, in lockstep.

Rank 0 owns the requests. Before each step it broadcasts, over a gloo group of its own (CPU
objects, apart from the model's NCCL collectives), the commands it applied since the last one
(adds, aborts); every other rank applies them to its own LLMEngine and runs the same step, whose
forward holds the same collectives. The engines stay identical because everything they decide
from is: the commands in order, the config, the page count (ModelRunner takes the smallest over
the ranks) and the sampled tokens (ModelRunner broadcasts rank 0's). So scheduling, preemption,
prefix caching, stops and async scheduling run unchanged on every rank, and only rank 0's
outputs are used (docs/parallel.md#the-engine).

While rank 0 is idle it sends a heartbeat every second, so that a worker waiting for commands
times out only when rank 0 is gone; rank 0 watches the workers it started, from the start: while
they join the group, load their shards and build their engines it polls them (`launch`), so one
that dies there fails the start at once, named (under NCCL by aborting the group, `_BuildWatch`). A rank that dies makes the others fail (a collective raises, a
heartbeat finds the process gone, or a worker's parent is gone), never hang.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from qoq.distributed import (DEFAULT_TIMEOUT_S, TPGroup, default_backend, destroy, disable_nvlink_multicast,
                             init_from_env, init_process_group, select_device)
from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.engine.sequence import RequestOutput
from qoq.model.loader import load_tokenizer, resolve_model_path
from qoq.model.qserve_format import is_qserve_checkpoint
from qoq.model.tensor_parallel import load_checkpoint_shard, load_hf_shard, load_qserve_shard

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# (tp) -> (this rank's model shard, tokenizer); picklable: it travels to the worker processes.
ShardLoader = Callable[[TPGroup], tuple]


class ControlChannel:
    """Rank 0's messages to the others: a gloo group of its own, whatever the model's backend."""

    def __init__(self, tp: TPGroup, timeout_s: float) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def recv(self) -> tuple:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class LockstepEngine:
    """Rank 0's engine: an LLMEngine whose adds, aborts and steps the other ranks replay (`follow`).

    Everything else (tokenize, limits, stats, requests...) is the LLMEngine's. `on_fatal(err)`
    runs on the heartbeat thread when a worker is found gone (the server exits there); without
    it, the next add or step raises.
    """

    def __init__(self, engine: LLMEngine, channel: ControlChannel, workers: list[subprocess.Popen] = (),
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._channel = channel
        self._workers = list(workers)
        self.on_fatal = on_fatal
        self.fatal: BaseException | None = None
        self._pending: list[tuple] = []  # commands applied here, not yet sent
        self._lock = threading.Lock()  # one sender at a time: the caller's thread or the heartbeat
        self._stepping = False
        self._last_sent = time.monotonic()
        self._closed = False
        self._heartbeat = threading.Thread(target=self._beat, name="qoq-tp-heartbeat", daemon=True)
        self._heartbeat.start()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def add_request(self, prompt: str | list[int], params=None, request_id: str | None = None) -> str:
        self._check()
        prompt_ids = self.engine.tokenize(prompt)
        with self._lock:
            request_id = self.engine.add_request(prompt_ids, params, request_id)
            self._pending.append(("add", request_id, prompt_ids, params))
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        with self._lock:
            self._pending.append(("abort", request_id))
            return self.engine.abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        self._check()
        with self._lock:
            self._stepping = True
            self._send("step")
        try:
            return self.engine.step()
        finally:
            self._stepping = False

    def close(self, kill: bool = False) -> None:
        """Stop the workers (they leave their loop and exit) and leave the group. `kill`: after a
        failed step, when a worker may be stuck in a collective that will never complete."""
        if self._closed:
            return
        self._closed = True
        if kill or self.fatal is not None:
            _reap(self._workers, 0)
            return
        try:
            with self._lock:
                self._send("stop")
        except Exception as err:  # noqa: BLE001 - a worker already gone: it is stopped anyway
            log.warning("could not tell the workers to stop: %s", err)
        _reap(self._workers, 30)
        destroy(self.engine.runner.tp)

    def _send(self, kind: str) -> None:  # under self._lock
        message, self._pending = (kind, self._pending), []
        self._channel.send(message)
        self._last_sent = time.monotonic()

    def _check(self) -> None:
        if self.fatal is not None:
            raise RuntimeError(f"a tensor-parallel rank failed: {self.fatal}") from self.fatal
        if self._closed:
            raise RuntimeError("the engine is closed")

    def _beat(self) -> None:
        while not self._closed and self.fatal is None:
            time.sleep(HEARTBEAT_S / 4)
            try:
                for rank, proc in enumerate(self._workers, 1):
                    if proc.poll() is not None:
                        raise RuntimeError(f"tensor-parallel rank {rank} {_exit_status(proc)}")
                if not self._stepping and time.monotonic() - self._last_sent >= HEARTBEAT_S:
                    with self._lock:
                        if not self._closed and not self._stepping:
                            self._send("idle")
            except Exception as err:  # noqa: BLE001 - a rank is gone: the engine cannot go on
                if self._closed:
                    return
                self.fatal = err
                log.critical("%s: the engine cannot go on", err)
                if self.on_fatal is not None:
                    self.on_fatal(err)
                return


def follow(engine: LLMEngine, channel: ControlChannel) -> None:
    """A worker rank: apply rank 0's commands and run its steps until it says stop."""
    while True:
        kind, commands = channel.recv()
        for command in commands:
            if command[0] == "add":
                _, request_id, prompt_ids, params = command
                engine.add_request(prompt_ids, params, request_id)
            else:
                engine.abort_request(command[1])
        if kind == "stop":
            return
        if kind == "step":
            engine.step()


# -- processes ---------------------------------------------------------------------------------
def launch(load: ShardLoader, config: EngineConfig, world_size: int, backend: str | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S,
           on_fatal: Callable[[BaseException], None] | None = None) -> LockstepEngine:
    """Start ranks 1..N-1 as processes on this host, join the group as rank 0 here, and return
    rank 0's engine (each rank loads its shard with `load`; under NCCL rank r takes GPU r).

    Until the engines exist rank 0 waits for the workers twice, polling that each is alive: for
    all to join the group, and, after its own shard, for theirs. A worker that exits meanwhile
    fails the start at once with its rank and exit code, not after a collective's timeout."""
    disable_nvlink_multicast()  # the workers inherit it
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"tensor parallel size {world_size} needs {world_size} GPUs; "
                         f"{torch.cuda.device_count()} are visible")
    # Rank 0 serves the store before any worker starts: the group meets through it, and the
    # workers say through it when they have joined and loaded.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    workers = [_start_worker((rank, world_size, store.port, backend, timeout_s, load, config))
               for rank in range(1, world_size)]
    tp = None
    try:
        _await_workers(store, "joined", workers, timeout_s)
        tp = init_process_group(0, world_size, None, backend, timeout_s, store=dist.PrefixStore("pg", store))
        channel = ControlChannel(tp, timeout_s)
        model, tokenizer = load(tp)
        _await_workers(store, "loaded", workers, timeout_s)
        with _BuildWatch(workers, backend):  # the engines' build runs collectives (KV sizing, graphs)
            engine = LLMEngine(model, tokenizer, config)
        _await_workers(store, "ready", workers, timeout_s)
    except BaseException as err:
        dead = _dead_worker(workers)
        _reap(workers, 0)
        destroy(tp)  # a later launch in this process starts a group afresh
        if dead is not None and not isinstance(err, (_StartFailed, TimeoutError)):
            rank, proc = dead  # a collective failed because a worker died: say which
            raise _StartFailed(f"tensor-parallel rank {rank} {_exit_status(proc)} while building its "
                               f"engine (its log, marked 'rank {rank}', says why)") from err
        raise
    return LockstepEngine(engine, channel, workers, on_fatal)


class _StartFailed(RuntimeError):
    """A worker died during launch; the message names it and what it was doing."""


def _dead_worker(workers: list[subprocess.Popen]) -> tuple[int, subprocess.Popen] | None:
    return next(((rank, proc) for rank, proc in enumerate(workers, 1) if proc.poll() is not None), None)


class _BuildWatch:
    """While rank 0 builds its engine, a worker that dies leaves rank 0 in a collective. Under gloo
    that collective fails at once (the peer's socket closes); NCCL's would wait out the group's
    timeout and then take the process down. So under NCCL this watch, on seeing a worker gone,
    aborts the group, which fails the pending collective now; if rank 0 is still stuck
    `GRACE_S` later, it ends the process with the same message NCCL would have ended it with
    minutes later."""

    GRACE_S = 10.0

    def __init__(self, workers: list[subprocess.Popen], backend: str) -> None:
        self.workers, self.backend = workers, backend
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="qoq-tp-build-watch")

    def __enter__(self) -> "_BuildWatch":
        if self.backend == "nccl":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            dead = _dead_worker(self.workers)
            if dead is None:
                continue
            rank, proc = dead
            log.critical("tensor-parallel rank %d %s while building its engine: aborting the group", rank,
                         _exit_status(proc))
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as err:  # noqa: BLE001 - an experimental API: the grace period covers it
                log.warning("could not abort the process group: %s", err)
            if not self._done.wait(self.GRACE_S):
                log.critical("rank 0 is still waiting on rank %d after %.0f s: exiting", rank, self.GRACE_S)
                _reap(self.workers, 0)
                os._exit(1)
            return


# What a worker is doing until it says `phase` (launch's start-up messages through the store).
_PHASES = {"joined": "joining the group", "loaded": "loading its shard", "ready": "building its engine"}
POLL_S = 0.1


def _await_workers(store: dist.Store, phase: str, workers: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait until every worker has said `phase`, checking meanwhile that each is still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [rank for rank in range(1, len(workers) + 1) if not store.check([f"{phase}/{rank}"])]
        if not waiting:
            return
        for rank in waiting:
            proc = workers[rank - 1]
            if proc.poll() is not None:
                raise _StartFailed(f"tensor-parallel rank {rank} {_exit_status(proc)} while {_PHASES[phase]} "
                                   f"(its log, marked 'rank {rank}', says why)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel rank(s) {', '.join(map(str, waiting))} still "
                               f"{_PHASES[phase]} after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _exit_status(proc: subprocess.Popen) -> str:
    code = proc.returncode
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def join_from_env(load: ShardLoader, config: EngineConfig,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> LockstepEngine | None:
    """Under torchrun (one host or several): rank 0 gets its engine; any other rank serves rank 0
    until it stops, then returns None."""
    tp = init_from_env(timeout_s=timeout_s)
    if tp is None:
        raise RuntimeError("join_from_env needs torchrun's WORLD_SIZE > 1")
    channel = ControlChannel(tp, timeout_s)
    model, tokenizer = load(tp)
    engine = LLMEngine(model, tokenizer, config)
    if tp.rank == 0:
        return LockstepEngine(engine, channel)
    follow(engine, channel)
    destroy(tp)
    return None


def _start_worker(payload: tuple) -> subprocess.Popen:
    # A plain subprocess, not multiprocessing: the server's engine process is a daemon, which
    # multiprocessing does not let have children.
    code = "from qoq.engine.parallel import _worker_main; _worker_main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    # sys.path first, as multiprocessing does: the loader may live in a module found through it.
    proc.stdin.write(pickle.dumps((sys.path, pickle.dumps(payload))))
    proc.stdin.close()
    return proc


def _worker_main() -> None:
    path, payload = pickle.load(sys.stdin.buffer)
    sys.path[:] = path
    rank, world_size, port, backend, timeout_s, load, config = pickle.loads(payload)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 stops the workers
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(name)s (rank {rank}): %(message)s")
    parent = os.getppid()

    def watch_parent() -> None:  # rank 0 killed: do not wait for a timeout
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        select_device(backend, rank)  # before "joined": a missing GPU fails while rank 0 still polls
        store.set(f"joined/{rank}", "1")
        tp = init_process_group(rank, world_size, None, backend, timeout_s, store=dist.PrefixStore("pg", store))
        channel = ControlChannel(tp, timeout_s)
        model, tokenizer = load(tp)
        store.set(f"loaded/{rank}", "1")
        engine = LLMEngine(model, tokenizer, config)
        store.set(f"ready/{rank}", "1")
        follow(engine, channel)
    except Exception:
        log.critical("tensor-parallel rank %d failed", rank, exc_info=True)
        os._exit(1)
    destroy(tp)


def _reap(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- loading a shard -----------------------------------------------------------------------------
def rank_device(device: str | torch.device) -> torch.device:
    """This rank's device: its own GPU (the one init_process_group selected) for "cuda"."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


def load_model_shard(model: str | Path | None, dtype: torch.dtype, device: str | torch.device, tp: TPGroup):
    """(this rank's shard, tokenizer): a qoq checkpoint, a QServe checkpoint or a HF safetensors
    folder (a converted GGUF file too), read a decoder layer at a time and sliced as it comes."""
    folder = resolve_model_path(model)
    device = rank_device(device)
    if (folder / "quant_config.json").exists():
        shard = load_checkpoint_shard(folder, tp, dtype, device)
    elif is_qserve_checkpoint(folder):
        shard = load_qserve_shard(folder, tp, dtype, device)
    else:
        shard = load_hf_shard(folder, tp, dtype, device)
    return shard, load_tokenizer(folder)
