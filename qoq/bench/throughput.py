"""`qoq bench throughput`: end-to-end generation throughput through the real engine (QServe protocol).

A model with random weights in the packed format of the chosen precision is built from a config
kept in the repo; `batch` requests of `input_len` random tokens each ask for exactly `output_len`
tokens (EOS ignored, no detokenization) and are submitted at once. Throughput is generated
tokens over the wall time of the whole run, prefill included. With `tensor_parallel_size` N the
engine runs over N processes in lockstep (engine/parallel.py), each drawing only its own shard
of the random model; times are rank 0's.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from qoq.bench.random_model import bench_quant_config, bundled_config, random_model
from qoq.bench.roofline import Ceilings, roofline_tokens_per_s
from qoq.config import Granularity, QuantConfig
from qoq.distributed import TPGroup
from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.engine import parallel
from qoq.host import set_cpu_threads
from qoq.sampling import SamplingParams


@dataclass
class ThroughputResult:
    system: str
    config: str
    precision: str
    group_size: int
    batch: int
    input_len: int
    output_len: int
    tokens_per_s: float
    seconds: float
    decode_step_ms: float  # median wall time of the pure-decode steps
    # Of which the model runner (inputs, forward, sampling; with async scheduling, launching the step
    # plus waiting for the previous step's tokens); the rest is the engine's Python.
    decode_forward_ms: float
    peak_memory_gib: float  # rank 0's GPU under tensor parallelism
    tensor_parallel_size: int = 1  # processes (GPUs) the model is split over (docs/parallel.md)
    roofline_tokens_per_s: float | None = None
    roofline_fraction: float | None = None
    # Where the wall time went, by kind of step (see `step_phases`).
    phases: dict | None = None
    # The engine's serving features in the run (on by default, as a user's `qoq serve` has them).
    chunked_prefill: bool | None = None
    prefix_caching: bool | None = None
    max_num_batched_tokens: int | None = None
    prefill_graph_mode: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _median_ms(seconds: list[float]) -> float:
    return 1000 * sorted(seconds)[len(seconds) // 2] if seconds else float("nan")


def step_phases(steps: list[tuple[int, int, float]], batch: int) -> dict:
    """Sum a run's steps (prefill tokens, decode rows, seconds) by phase: steps with prefill work
    (the ramp-up, where admitted sequences already decode), pure decode steps of the full batch
    (at least 95% of it running) and the tail (sequences finishing, the batch shrinking)."""
    phases = {"mixed": [0, 0.0, 0, 0], "full_decode": [0, 0.0, 0, 0], "tail_decode": [0, 0.0, 0, 0]}
    for prefill_tokens, decodes, seconds in steps:
        kind = "mixed" if prefill_tokens else "full_decode" if decodes >= 0.95 * batch else "tail_decode"
        p = phases[kind]
        p[0] += 1
        p[1] += seconds
        p[2] += prefill_tokens
        p[3] += decodes
    return {k: {"steps": n, "seconds": round(t, 4), "prefill_tokens": pt, "decode_tokens": dt,
                "ms_per_step": round(1000 * t / n, 3) if n else None} for k, (n, t, pt, dt) in phases.items()}


def _run_requests(engine: LLMEngine, prompts: list[list[int]], output_len: int):
    """Submit all prompts, step to the end; returns (seconds, decode step times, decode forward
    times, per-step (prefill tokens, decode rows, seconds))."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, detokenize=False, output_kind="final")
    forward_times: list[float] = []
    runner = engine.runner
    launch = runner.launch
    in_runner = [0.0]  # seconds spent in the model runner during the current step
    pure_decode = [False]  # whether the step that just ran (launched, with async scheduling) had no prefill
    shape = [0, 0]  # its prefill tokens and decode rows

    def timed_launch(batch, prev):  # every step: launching, and later waiting for the tokens
        t0 = time.perf_counter()
        step = launch(batch, prev)
        in_runner[0] += time.perf_counter() - t0
        pure_decode[0] = not batch.chunks
        shape[:] = batch.num_tokens - len(batch.decodes), len(batch.decodes)
        read = step.token_ids

        def timed_read():
            t0 = time.perf_counter()
            tokens = read()
            in_runner[0] += time.perf_counter() - t0
            return tokens

        step.token_ids = timed_read
        return step

    runner.launch = timed_launch
    for prompt in prompts:
        engine.add_request(prompt, params)
    decode_steps: list[float] = []
    steps: list[tuple[int, int, float]] = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        in_runner[0], pure_decode[0], shape[:] = 0.0, False, (0, 0)
        t0 = time.perf_counter()
        engine.step()  # returns once a step's tokens are read back, which waits for the device
        elapsed = time.perf_counter() - t0
        steps.append((shape[0], shape[1], elapsed))
        if pure_decode[0]:
            decode_steps.append(elapsed)
            forward_times.append(in_runner[0])
    seconds = time.perf_counter() - start
    runner.launch = launch
    return seconds, decode_steps, forward_times, steps


def run_throughput(config_name: str, precision: str, granularity: Granularity, batch: int, input_len: int,
                   output_len: int, device: str = "cuda", ceilings: Ceilings | None = None,
                   max_num_batched_tokens: int = 8192, num_pages: int | None = None,
                   max_batch: int = 1024, tensor_parallel_size: int = 1,
                   threads: int | None = None, engine_args: dict | None = None) -> ThroughputResult:
    """engine_args: EngineConfig fields over the defaults (enable_chunked_prefill=False, ...)."""
    cfg = bundled_config(config_name)
    quant = bench_quant_config(precision, granularity)
    build = _engine_builder(config_name, quant, device, tensor_parallel_size, threads)
    max_len = input_len + output_len

    def engine_config(batch_size: int, pages: int | None, eager: bool) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=batch_size, max_num_batched_tokens=max(max_num_batched_tokens, max_len),
            max_model_len=max_len, kv_bits=quant.kv_bits, num_pages=pages, max_graph_batch_size=batch_size,
            enforce_eager=eager, cpu_kv_cache_gib=0.25, **(engine_args or {}))

    if batch <= 0:  # "max": as many sequences as the KV pages that fit in memory can hold in full
        probe = build(engine_config(max_batch, num_pages, eager=True))  # sized for max_batch sequences at most
        num_pages = int(probe.block_manager.num_pages * 0.97)  # leave room for the CUDA graphs' pool
        batch = min(max_batch, num_pages // -(-max_len // probe.config.page_size))
        _close(probe)
        del probe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if batch < 1:
            raise RuntimeError(f"{config_name} at {precision}: not even one sequence of {max_len} tokens fits")
    engine = build(engine_config(batch, num_pages, eager=device != "cuda"))
    # The model and engine outlive the run: keep the cyclic GC from walking them at every full
    # collection the per-step allocations trigger (~100 ms each at batch 1000). Unfrozen below,
    # or their memory could never be collected.
    gc.collect()
    gc.freeze()
    try:
        gen = torch.Generator().manual_seed(0)
        vocab = cfg.vocab_size
        # Warm-up (as a server's start-up would): Triton compiles each kernel configuration at its
        # first launch, and the timed run must not pay for it. Short prompts cover the decode
        # shapes (the CUDA graphs were captured at engine start); a wave of full-length prompts
        # covers the prefill steps' large-M GEMMs and prefill attention, including a mixed step
        # (prefill + decode rows, an M not divisible by 16, which Triton specializes apart).
        warm_len = min(input_len, 32)
        _run_requests(engine, [torch.randint(0, vocab, (warm_len,), generator=gen).tolist()] * 2, min(output_len, 4))
        wave = max(1, min(batch, 2 * max_num_batched_tokens // max(1, input_len) + 1))
        _run_requests(engine, [torch.randint(0, vocab, (input_len,), generator=gen).tolist() for _ in range(wave)],
                      min(output_len, 3))
        prompts = [torch.randint(0, vocab, (input_len,), generator=gen).tolist() for _ in range(batch)]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, decode_steps, forward_times, steps = _run_requests(engine, prompts, output_len)
        tokens_per_s = batch * output_len / seconds
        # The roofline is one GPU's (its ceilings, the whole model's bytes and operations).
        roof = roofline_tokens_per_s(cfg, quant, batch, input_len, output_len, ceilings) \
            if ceilings and tensor_parallel_size == 1 else None
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0  # rank 0's GPU
        result = ThroughputResult("qoq", config_name, precision, granularity.saved() if quant.weight_bits == 4 else -1,
                                  batch, input_len, output_len, tokens_per_s, seconds, _median_ms(decode_steps),
                                  _median_ms(forward_times), peak, tensor_parallel_size,
                                  roof, tokens_per_s / roof if roof else None, step_phases(steps, batch),
                                  engine.config.enable_chunked_prefill, engine.config.enable_prefix_caching,
                                  engine.config.max_num_batched_tokens, engine.config.prefill_graph_mode)
    finally:
        gc.unfreeze()
        _close(engine)
    # The engine's CUDA graphs and runner refer to each other: collect the cycle before the next
    # model is built, or its KV-cache sizing sees this one's memory as taken.
    del engine, build
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _engine_builder(config_name: str, quant: QuantConfig, device: str, tensor_parallel_size: int,
                    threads: int | None) -> Callable[[EngineConfig], LLMEngine]:
    """EngineConfig -> engine. One process: one random model, shared by every engine built. Tensor
    parallel: each engine is a new group of processes (engine/parallel.launch), in which every
    rank draws only its own shard of the random model (random_model with its group)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    if tensor_parallel_size == 1:
        model = random_model(bundled_config(config_name), quant, device, dtype)
        return lambda config: LLMEngine(model, None, config)
    load = functools.partial(_random_shard, config_name, quant, device, dtype, threads)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return lambda config: parallel.launch(load, config, tensor_parallel_size, backend)


def _random_shard(config_name: str, quant: QuantConfig, device: str, dtype: torch.dtype, threads: int | None,
                  tp: TPGroup) -> tuple:
    """A rank's (shard, tokenizer) for engine/parallel.launch: no tokenizer, the prompts are ids."""
    set_cpu_threads(threads)
    return random_model(bundled_config(config_name), quant, parallel.rank_device(device), dtype, tp=tp), None


def _close(engine) -> None:
    """Stop a tensor-parallel engine's other ranks (nothing to do for one process)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
