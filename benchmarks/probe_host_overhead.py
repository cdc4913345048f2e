"""Where a mixed step's host time goes (GPU script): a running batch decodes while a prompt
arrives; the step that prefills it runs eagerly (no CUDA graph), and under `qoq serve` such steps
took ~60-80 ms of host time against ~20 ms of kernels for a 1024-token prompt.

For one such step (synchronous scheduling, so a step is what it launches): its wall time and its
kernels' GPU time (CUDA events), every operation that synchronizes with the device (torch's sync
debug mode, with the qoq frame that asked), and a cProfile of the host side.

    python benchmarks/probe_host_overhead.py --batch 32 --prompt-len 1024

Then, as `qoq serve` runs it (async scheduling, steps back to back, a prompt arriving every
--arrive-every steps): each step call's launch, wait for the previous step's tokens and the rest
(processing), by whether the launched step holds prompt tokens. A launch that takes as long as a
step waits on the device somewhere.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.bench.random_model import bundled_config, random_model  # noqa: E402
from qoq.config import G128, QuantConfig  # noqa: E402
from qoq.engine.config import EngineConfig  # noqa: E402
from qoq.engine.llm_engine import LLMEngine  # noqa: E402
from qoq.sampling import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="llama-3-8b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    p.add_argument("--graphs-only", action="store_true", help="skip the eager engine")
    p.add_argument("--prefill-graph-mode", default="piecewise", choices=["piecewise", "full"])
    p.add_argument("--arrive-every", type=int, default=8, help="steps between prompts in the async stream")
    p.add_argument("--stream-steps", type=int, default=120, help="async stream steps (0: skip)")
    args = p.parse_args()
    cfg = bundled_config(args.config)
    model = random_model(cfg, QuantConfig("w4a8kv4", G128, qk_hadamard=cfg.head_dim >= 32), device=args.device,
                         dtype=torch.float16 if args.device == "cuda" else torch.float32)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)

    def prompt() -> list[int]:
        return torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()

    long = SamplingParams(max_tokens=400, ignore_eos=True, detokenize=False)

    def running_engine(eager: bool, async_scheduling: bool = False) -> LLMEngine:
        engine = LLMEngine(model, None, EngineConfig(
            max_num_seqs=args.batch + 64, max_num_batched_tokens=args.budget, max_model_len=args.prompt_len + 512,
            async_scheduling=async_scheduling, enforce_eager=eager, gpu_memory_utilization=0.45,
            prefill_graph_mode=args.prefill_graph_mode))
        for _ in range(args.batch):
            engine.add_request(prompt(), long)
        while engine.scheduler.waiting:
            engine.step()
        for _ in range(3):
            engine.step()
        return engine

    def timed_step(label: str) -> tuple[float, float]:
        if not cuda:
            t0 = time.perf_counter()
            engine.step()
            return 1e3 * (time.perf_counter() - t0), float("nan")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync()
        t0 = time.perf_counter()
        start.record()
        engine.step()
        end.record()
        sync()
        wall = 1e3 * (time.perf_counter() - t0)
        return wall, start.elapsed_time(end)

    for eager in ((False,) if args.graphs_only else (True, False)) if cuda else (True,):
        engine = running_engine(eager)
        rows = []
        for i in range(args.repeats):
            rows.append(("decode",) + timed_step("decode"))
            engine.add_request(prompt(), long)
            rows.append(("mixed",) + timed_step("mixed"))
        label = "eager" if eager else "graphs (decode: whole step; steps with prompt tokens: piecewise)"
        print(f"-- {label}: batch {args.batch}, prompt {args.prompt_len}")
        for kind, wall, gpu in rows:
            print(f"{kind:7s} wall {wall:7.2f} ms   device span {gpu:7.2f} ms")
        if eager and cuda:  # the graphs' engine follows
            del engine
            gc.collect()
            torch.cuda.empty_cache()

    if cuda:  # the device's busy time in one mixed step: the sum of its kernels against the wall
        from torch.profiler import ProfilerActivity, profile

        engine.add_request(prompt(), long)
        sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as kprof:
            engine.step()
            sync()
        wall = 1e3 * (time.perf_counter() - t0)
        kernels = [e for e in kprof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3
        print(f"mixed step under the profiler: wall {wall:.2f} ms, {len(kernels)} kernels, busy {busy:.2f} ms")
        by_name: Counter = Counter()
        calls: Counter = Counter()
        for e in kernels:
            by_name[e.name[:60]] += e.device_time / 1e3
            calls[e.name[:60]] += 1
        for name, ms in by_name.most_common(10):
            print(f"  {ms:7.2f} ms {calls[name]:5d}x  {name}")

    # every synchronizing call inside a mixed step, by the innermost qoq frame that made it
    sites: Counter = Counter()
    engine.add_request(prompt(), long)
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack() if "/qoq/" in f.filename]
            where = f"{frames[-1].filename.split('/qoq/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
            sites[where] += 1

        warnings.showwarning = record
        engine.step()
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        sync()
    print(f"synchronizing calls in one mixed step: {sum(sites.values())}")
    for where, n in sites.most_common(15):
        print(f"  {n:4d}  {where}")

    engine.add_request(prompt(), long)
    prof = cProfile.Profile()
    sync()
    prof.enable()
    engine.step()
    sync()
    prof.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(28)
        print("\n".join(line[:170] for line in text.getvalue().splitlines()[4:40]))

    if args.stream_steps:
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        async_stream(running_engine(not cuda, async_scheduling=True), prompt, long, args)


def async_stream(engine: LLMEngine, prompt, params: SamplingParams, args) -> None:
    """Per step call under async scheduling: launch, wait and the rest, in ms, by launched kind."""
    runner = engine.runner
    launch, cur = runner.launch, {}

    def timed_launch(batch, prev):
        t0 = time.perf_counter()
        step = launch(batch, prev)
        cur["launch"], cur["kind"] = time.perf_counter() - t0, "mixed" if batch.chunks else "decode"
        read = step.token_ids

        def timed_read():
            t1 = time.perf_counter()
            tokens = read()
            cur["wait"] = time.perf_counter() - t1
            return tokens

        step.token_ids = timed_read
        return step

    runner.launch = timed_launch
    rows: dict[str, list[tuple[float, float, float]]] = {"decode": [], "mixed": []}
    for i in range(args.stream_steps):
        if i % args.arrive_every == 0:
            engine.add_request(prompt(), params)
        cur.clear()
        t0 = time.perf_counter()
        engine.step()
        total = time.perf_counter() - t0
        if "kind" in cur and i >= 4:
            rows[cur["kind"]].append((1e3 * total, 1e3 * cur["launch"], 1e3 * cur.get("wait", 0.0)))
    runner.launch = launch
    print(f"-- async stream: a prompt every {args.arrive_every} steps, budget {args.budget}; per step call, "
          "by the kind it launched (median / p90 ms)")
    for kind, r in rows.items():
        if not r:
            continue
        cols = list(zip(*r))

        def q(xs, f):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(f * len(xs)))]

        total, launched, waited = (cols[0], cols[1], cols[2])
        rest = [t - a - b for t, a, b in r]
        print(f"{kind:7s} {len(r):4d} calls  total {q(total, .5):6.2f}/{q(total, .9):6.2f}  launch "
              f"{q(launched, .5):6.2f}/{q(launched, .9):6.2f}  wait {q(waited, .5):6.2f}/{q(waited, .9):6.2f}  "
              f"rest {q(rest, .5):6.2f}/{q(rest, .9):6.2f}")


if __name__ == "__main__":
    main()
