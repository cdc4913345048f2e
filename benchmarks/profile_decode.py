"""Where one decode step's time goes: a torch.profiler table of the kernels of eager decode steps.

    python benchmarks/profile_decode.py --precision w4a8kv4 --batch 256 --context 1024
    python benchmarks/profile_decode.py --prefill --batch 8 --context 1024   # one 8192-token prefill step
    python benchmarks/profile_decode.py --mixed --batch 993 --context 1024   # ramp-up steps: prefills + decodes

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
    args = parser.parse_args()

    cfg, quant = bundled_config(args.config), QuantConfig(args.precision, args.granularity,
                                                                qk_hadamard=args.qk_hadamard and "kv16" not in args.precision)
    model = random_model(cfg, quant)
    # Decode: no sequence may finish before the profiled steps, and the first admitted ones decode
    # through the whole prefill phase (one token per step while later prompts prefill).
    decode_tokens = args.batch * args.context // 8192 + 2 * args.steps + 16
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=args.batch, max_model_len=args.context + decode_tokens + 8,
                                                 max_num_batched_tokens=8192, enforce_eager=True))
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
