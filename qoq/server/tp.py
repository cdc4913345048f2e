"""`qoq serve --tensor-parallel-size N`: the engine process becomes rank 0 of N.

On one host the engine process starts ranks 1..N-1 itself (engine/parallel.launch). Under
torchrun (one host or several: docs/parallel.md#launching), every process runs `qoq serve`;
rank 0 serves HTTP and its engine process joins the group as rank 0 (it inherits torchrun's
environment), every other rank only follows rank 0's engine (`serve_worker_from_env`).

A rank that dies ends the server: rank 0's engine process exits 1 (at once when the heartbeat
finds a worker gone, or when a step's collective fails), the HTTP server sees its engine gone
and exits 1, and the workers see rank 0 gone.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from qoq.engine.config import EngineConfig
from qoq.engine.parallel import LockstepEngine, join_from_env, launch, load_model_shard, rank_device
from qoq.host import set_cpu_threads
from qoq.model.tensor_parallel import shard_model

log = logging.getLogger(__name__)


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_spec_shard(spec, tp):
    """This rank's shard of what the ModelSpec names (random weights: the same seed on every rank)."""
    set_cpu_threads(spec.threads)
    dtype = getattr(torch, spec.dtype)
    if spec.random_config is None:
        return load_model_shard(spec.model, dtype, spec.device, tp)
    from qoq.bench.random_model import bench_quant_config, bundled_config, random_model
    from qoq.bench.synthetic_tokenizer import synthetic_tokenizer

    config = bundled_config(spec.random_config)
    model = random_model(config, bench_quant_config(spec.precision), device="cpu", dtype=dtype)
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    return shard_model(model, tp).to(rank_device(spec.device)), synthetic_tokenizer(config.vocab_size, eos)


def _exit_now(err: BaseException) -> None:
    log.critical("a tensor-parallel rank is gone (%s); the engine process exits (code 1)", err)
    logging.shutdown()
    os._exit(1)


def start_engine(spec, config: EngineConfig) -> LockstepEngine:
    """Rank 0's engine for the engine process: its workers started here, or torchrun's."""
    load = functools.partial(load_spec_shard, spec)
    if torchrun_world_size() > 1:
        engine = join_from_env(load, config)
        engine.on_fatal = _exit_now
        return engine
    return launch(load, config, spec.tensor_parallel_size, on_fatal=_exit_now)


def serve_worker_from_env(spec, config: EngineConfig) -> int:
    """A torchrun rank other than 0: follow rank 0's engine until it stops (no HTTP here)."""
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(levelname)s %(name)s (rank {os.environ['RANK']}): %(message)s")
    join_from_env(functools.partial(load_spec_shard, spec), config)
    return 0
