"""Where one decode step's time goes: a torch.profiler table of the kernels of eager decode steps.

    python benchmarks/profile_decode.py --precision w4a8kv4 --batch 256 --context 1024
    python benchmarks/profile_decode.py --prefill --batch 8 --context 1024   # one 8192-token prefill step
    python benchmarks/profile_decode.py --mixed --batch 993 --context 1024   # ramp-up steps: prefills + decodes

--graphs captures the decode step in CUDA graphs (as serving runs it) and adds a table of each
kernel's *exposed* time: from the later of its start and the end of every kernel before it, to its
end. Under programmatic dependent launch a kernel starts before the one ahead of it ends, so its
duration double-counts; the exposed times add up to the step's GPU span.

--mixed profiles the steps of a serving run's ramp-up (every step admits prompts up to the token
budget while the sequences admitted earlier decode) and prints their wall time next to the GPU
time of their kernels: a gap is host time the device waits for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.bench.random_model import bundled_config, random_model  # noqa: E402
from qoq.config import G128, Granularity, QuantConfig  # noqa: E402
from qoq.engine.config import EngineConfig  # noqa: E402
from qoq.engine.llm_engine import LLMEngine  # noqa: E402
from qoq.sampling import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="llama-3-8b")
    parser.add_argument("--precision", default="w4a8kv4")
    parser.add_argument("--group-size", dest="granularity", type=Granularity.parse, default=G128, help="128 or -1")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--qk-hadamard", action=argparse.BooleanOptionalAction, default=True,
                        help="the q/k Hadamard in the RoPE kernel (as qoq quantize makes KV4/KV8 models)")
    parser.add_argument("--prefill", action="store_true", help="profile prefill steps of `batch` prompts instead")
    parser.add_argument("--mixed", action="store_true", help="profile ramp-up steps (prefills + decodes), see above")
    parser.add_argument("--graphs", action="store_true", help="decode under CUDA graphs, with the exposed-time table")
    args = parser.parse_args()

    cfg, quant = bundled_config(args.config), QuantConfig(args.precision, args.granularity,
                                                                qk_hadamard=args.qk_hadamard and "kv16" not in args.precision)
    model = random_model(cfg, quant)
    # Decode: no sequence may finish before the profiled steps, and the first admitted ones decode
    # through the whole prefill phase (one token per step while later prompts prefill).
    decode_tokens = args.batch * args.context // 8192 + 2 * args.steps + 16
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=args.batch, max_model_len=args.context + decode_tokens + 8,
                                                 max_num_batched_tokens=8192,
                                                 enforce_eager=not args.graphs))
    params = SamplingParams(max_tokens=1 if args.prefill else decode_tokens, ignore_eos=True, detokenize=False)
    gen = torch.Generator().manual_seed(0)

    def add_batch() -> None:
        for _ in range(args.batch):
            engine.add_request(torch.randint(0, cfg.vocab_size, (args.context,), generator=gen).tolist(), params)

    if args.mixed:
        return profile_mixed(args, engine, cfg, gen, params)
    add_batch()
    if args.prefill:  # one warm-up wave (Triton compiles), a timed wave, then the profiled one
        import time

        while engine.has_unfinished_requests():
            engine.step()
        walls = []
        for _ in range(args.steps):
            add_batch()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            torch.cuda.synchronize()
            walls.append(1e3 * (time.perf_counter() - t0))
        print(f"prefill of {args.batch} x {args.context} tokens to the first token: wall ms per wave "
              + " ".join(f"{w:.1f}" for w in walls))
        add_batch()
    else:
        while engine.scheduler.waiting:  # all prefills done
            engine.step()
        for _ in range(3):
            engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    kind = "prefill" if args.prefill else "decode"
    running = len(engine.scheduler.running)
    print(f"{args.precision} {args.granularity} batch {args.batch} ({running} running) context ~{args.context}, "
          f"{args.steps} {kind} steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=26, max_name_column_width=60))
    if args.graphs:
        print_exposed(prof, args.steps)


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def exposed_times(kernels: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """(name, start, end) of kernels on one stream -> name: [count, total duration, total exposed]."""
    out: dict[str, list[float]] = {}
    done = float("-inf")
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        row = out.setdefault(name, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += end - start
        row[2] += max(0.0, end - max(start, done))
        done = max(done, end)
    return out


def print_exposed(prof, steps: int) -> None:
    """The exposed-time table: per kernel (the int8 GEMMs by their place in the layer), count,
    mean duration and exposed microseconds per step."""
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    kernels.sort(key=lambda k: k[1])
    gemm = 0
    labelled = []
    for name, start, end in kernels:
        if name == "_int8_gemm_kernel":  # qkv, o_proj, gate_up, down_proj in every layer
            name = f"{name} ({('qkv', 'o_proj', 'gate_up', 'down_proj')[gemm % 4]})"
            gemm += 1
        labelled.append((name, start, end))
    table = exposed_times(labelled)
    span = (kernels[-1][2] - kernels[0][1]) / steps if kernels else 0.0
    total = sum(r[2] for r in table.values()) / steps
    print(f"exposed time per step: {total:.1f} us of a {span:.1f} us span (gaps are the rest)")
    print(f"{'kernel':50s} {'per step':>8s} {'mean us':>8s} {'exposed us/step':>16s}")
    for name, (count, dur, exp) in sorted(table.items(), key=lambda kv: -kv[1][2]):
        print(f"{_short(name):50s} {count / steps:8.1f} {dur / count:8.2f} {exp / steps:16.1f}")


def profile_mixed(args, engine: LLMEngine, cfg, gen: torch.Generator, params: SamplingParams) -> None:
    import time

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(0, cfg.vocab_size, (args.context,), generator=gen).tolist() for _ in range(n)]

    for p in prompts(17):  # warm-up: Triton compiles the prefill and mixed shapes
        engine.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True, detokenize=False))
    while engine.has_unfinished_requests():
        engine.step()
    for p in prompts(args.batch):
        engine.add_request(p, params)
    while len(engine.scheduler.running) < args.batch // 2 and engine.scheduler.waiting:  # ~half admitted
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
    print(f"{args.precision} {args.granularity}: mixed steps with {len(engine.scheduler.running)} running, "
          f"{len(engine.scheduler.waiting)} waiting: wall {1e3 * wall:.1f} ms/step, GPU kernels {gpu:.1f} ms/step")
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
