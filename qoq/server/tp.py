"""`qoq serve --tensor-parallel-size N`: the engine process becomes rank 0 of N.

On one host the engine process starts ranks 1..N-1 itself (engine/parallel.launch). Under
torchrun (one host or several: docs/parallel.md#launching), every process runs `qoq serve`;
rank 0 serves HTTP and its engine process joins the group as rank 0 (it inherits torchrun's
environment), every other rank only follows rank 0's engine (`serve_worker_from_env`).

A rank that dies ends the server: rank 0's engine process exits 1 (at once when the heartbeat
finds a worker gone, or when a step's collective fails), the HTTP server sees its engine gone
and exits 1, and the workers see rank 0 gone. One that dies while the ranks start (joining the
group, loading its shard) fails the start at once: `qoq serve` exits 1 with an error naming it.
"""

from __future__ import annotations

import logging
import os

from qoq.engine.config import EngineConfig
from qoq.engine.parallel import LockstepEngine, join_from_env, launch

log = logging.getLogger(__name__)


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _exit_now(err: BaseException) -> None:
    log.critical("a tensor-parallel rank is gone (%s); the engine process exits (code 1)", err)
    logging.shutdown()
    os._exit(1)


def start_engine(spec, config: EngineConfig) -> LockstepEngine:
    """Rank 0's engine for the engine process: its workers started here, or torchrun's."""
    load = spec.load  # each rank's shard (ModelSpec.load with its group)
    if torchrun_world_size() > 1:
        engine = join_from_env(load, config)
        engine.on_fatal = _exit_now
        return engine
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    return launch(load, config, spec.tensor_parallel_size, backend, on_fatal=_exit_now)


def serve_worker_from_env(spec, config: EngineConfig) -> int:
    """A torchrun rank other than 0: follow rank 0's engine until it stops (no HTTP here)."""
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(levelname)s %(name)s (rank {os.environ['RANK']}): %(message)s")
    join_from_env(spec.load, config)
    return 0
