"""The engine's own per-step Python (scheduling, input preparation, outputs) with the model left out.

A 1-layer model prefills the requests; after that every decode step runs the real scheduler,
ModelRunner.prepare and LLMEngine.step bookkeeping, but returns a fixed token instead of
running the forward. CPU only, no timing asserts; docs/serving.md quotes its numbers.

Both scheduling modes do the same Python per step; the difference is where it lands on a GPU:
synchronous, after the device's step (so it adds to it); async (EngineConfig.async_scheduling),
while the device computes the step just launched (hidden when shorter than that step).

    python benchmarks/engine_overhead.py --batch 512 [--output-kind final|delta] [--async-scheduling on|off|both]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.bench.random_model import bundled_config  # noqa: E402
from qoq.engine.config import EngineConfig  # noqa: E402
from qoq.engine.llm_engine import LLMEngine  # noqa: E402
from qoq.engine.model_runner import StepInFlight  # noqa: E402
from qoq.engine.transfer import DeviceToHost  # noqa: E402
from qoq.model.llama import LlamaModel  # noqa: E402
from qoq.sampling import SamplingParams  # noqa: E402


def without_model(engine: LLMEngine) -> None:
    """Decode steps skip the forward: inputs are prepared, every sampled token is 1."""
    runner = engine.runner
    launch = runner.launch

    def launch_without_model(batch, prev):  # every step launches, synchronous or async scheduling
        if batch.prefills:
            return launch(batch, prev)
        runner.prepare(batch, prev.tokens if prev is not None else None)
        tokens = torch.ones(len(batch.seqs), dtype=torch.long)
        return StepInFlight(batch, batch.seqs, tokens, DeviceToHost(tokens))

    runner.launch = launch_without_model


def measure(args, async_scheduling: bool) -> list[float]:
    cfg = dataclasses.replace(bundled_config("llama-3-8b"), hidden_size=64, intermediate_size=128, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=32, vocab_size=1000)
    max_len = args.input_len + args.output_len
    engine = LLMEngine(LlamaModel(cfg).eval(), None, EngineConfig(
        max_num_seqs=args.batch, max_model_len=max_len, max_num_batched_tokens=8192,
        num_pages=args.batch * -(-max_len // 64), async_scheduling=async_scheduling))
    without_model(engine)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False,
                            output_kind=args.output_kind)
    for i in range(args.batch):
        engine.add_request([(i + j) % 999 + 1 for j in range(args.input_len)], params)
    while engine.scheduler.waiting or any(not s.output_token_ids for s in engine.scheduler.running):
        engine.step()  # until every prefill is launched and processed
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--output-kind", default="final", choices=["final", "delta"])
    parser.add_argument("--async-scheduling", default="both", choices=["on", "off", "both"])
    args = parser.parse_args()
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.async_scheduling]
    for async_scheduling in modes:
        times = measure(args, async_scheduling)
        print(f"batch {args.batch}, output_kind {args.output_kind}, async_scheduling "
              f"{'on' if async_scheduling else 'off'}: {len(times)} decode steps, "
              f"mean {1e3 * sum(times) / len(times):.2f} ms of engine Python per step", flush=True)


if __name__ == "__main__":
    main()
