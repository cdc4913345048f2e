"""Chunked prefill and prefix caching on a random Llama-3-8B-shaped w4a8kv4 engine (GPU script).

(a) Step times under a steady arrival of prompts at a running batch: a batch of `--batch` streams
    is admitted first (not timed), then `--arrivals` prompts of `--prompt-len` tokens arrive every
    `--arrival-every` steps, for `--steps` steps. Each step is timed whole (synchronous scheduling:
    a step ends with its tokens on the host); a running stream waits one step per token, so the
    step time is its inter-token latency. Chunking on (budget `--budget`, decodes first) against
    off (whole prompts, budget `--budget-unchunked` as the e2e runs use).
(b) TTFT of a shared-prefix workload: `--num-prefixes` prefixes of `--prefix-len` tokens, each
    asked `--num-questions` questions of `--question-len` tokens, `--output-len` tokens out, all
    submitted at once (prefix by prefix), with prefix caching on and off (async scheduling, the
    default engine).

    python benchmarks/bench_prefill_chunking.py            # writes $OUT/prefill-chunking.json
    python benchmarks/bench_prefill_chunking.py --config tiny.json --device cpu --batch 4 ...  (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.bench.random_model import bundled_config, random_model  # noqa: E402
from qoq.config import G128, QuantConfig  # noqa: E402
from qoq.engine.config import EngineConfig  # noqa: E402
from qoq.engine.llm_engine import LLMEngine  # noqa: E402
from qoq.sampling import SamplingParams  # noqa: E402


def _summary(ms: list[float]) -> dict:
    if not ms:
        return {"steps": 0}
    ms = sorted(ms)
    return {"steps": len(ms), "median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "max_ms": ms[-1], "mean_ms": statistics.fmean(ms)}


def _engine(model, args, max_len: int, max_num_seqs: int, budget: int, **config) -> LLMEngine:
    pages = max_num_seqs * -(-max_len // args.page_size) + 64
    return LLMEngine(model, None, EngineConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_len, kv_bits=4,
        num_pages=pages, page_size=args.page_size, max_graph_batch_size=min(max_num_seqs, 512),
        enforce_eager=args.device != "cuda", **config))


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_times(model, args, chunked: bool, gen: torch.Generator) -> dict:
    """(a): per-step wall times, split into pure-decode steps and steps with prefill work."""
    vocab = model.config.vocab_size
    decode_len = 2 * args.steps + 8  # the running streams outlive the timed steps
    arrivals = args.arrivals * -(-args.steps // args.arrival_every)
    budget = args.budget if chunked else args.budget_unchunked
    engine = _engine(model, args, args.prompt_len + decode_len, args.batch + arrivals + 1, budget=budget,
                     enable_chunked_prefill=chunked, enable_prefix_caching=False, async_scheduling=False)
    params = SamplingParams(max_tokens=decode_len, ignore_eos=True, detokenize=False, output_kind="final")

    def prompt():
        return torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()

    warm = SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False, output_kind="final")
    for _ in range(2):  # compile the prefill shapes and a mixed step (not timed)
        engine.add_request(prompt(), warm)
        engine.add_request(prompt()[:16], warm)
        _drain(engine)
    for _ in range(args.batch):
        engine.add_request(prompt(), params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()  # the running batch fills (not timed)
    runner, record = engine.runner, []
    launch = runner.launch

    def timed(batch, prev):
        _sync(args.device)
        t0 = time.perf_counter()
        step = launch(batch, prev)
        step.token_ids()  # read back: the step is done (synchronous scheduling reads them next anyway)
        record.append((batch.num_tokens - len(batch.decodes), len(batch.decodes), time.perf_counter() - t0))
        return step

    runner.launch = timed
    for step in range(args.steps):
        if step % args.arrival_every == 0:
            for _ in range(args.arrivals):
                engine.add_request(prompt(), params)
        t0 = time.perf_counter()
        engine.step()
        record[-1] = (*record[-1][:2], time.perf_counter() - t0)  # the whole step, engine Python included
    runner.launch = launch
    for seq in list(engine.requests):
        engine.abort_request(seq)
    decode = [1000 * s for p, d, s in record if not p]
    mixed = [1000 * s for p, d, s in record if p]
    result = {"chunked_prefill": chunked, "budget": engine.config.max_num_batched_tokens,
              "pure_decode": _summary(decode), "with_prefill": _summary(mixed),
              "all_steps": _summary(decode + mixed),
              "mean_prefill_tokens_per_mixed_step": statistics.fmean([p for p, _, _ in record if p] or [0]),
              "mean_decode_rows": statistics.fmean([d for _, d, _ in record] or [0])}
    del engine
    return result


def shared_prefix_ttft(model, args, caching: bool, gen: torch.Generator) -> dict:
    """(b): time to first token of each request (all submitted at t0), and the whole run."""
    vocab = model.config.vocab_size
    max_len = args.prefix_len + args.question_len + args.output_len
    engine = _engine(model, args, max_len, args.max_num_seqs, args.budget, enable_prefix_caching=caching)
    warm = SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)
    engine.add_request(torch.randint(0, vocab, (max_len - 2,), generator=gen).tolist(), warm)
    _drain(engine)
    engine.block_manager.num_queried_tokens = engine.block_manager.num_hit_tokens = 0
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    prefixes = [torch.randint(0, vocab, (args.prefix_len,), generator=gen).tolist() for _ in range(args.num_prefixes)]
    first_token: dict[str, float] = {}
    _sync(args.device)
    t0 = time.perf_counter()
    for p, prefix in enumerate(prefixes):
        for q in range(args.num_questions):
            question = torch.randint(0, vocab, (args.question_len,), generator=gen).tolist()
            engine.add_request(prefix + question, params, f"p{p}-q{q}")
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first_token:
                first_token[out.request_id] = time.perf_counter() - t0
    total = time.perf_counter() - t0
    ttft = sorted(1000 * t for t in first_token.values())
    stats = engine.stats()
    del engine
    return {"prefix_caching": caching, "requests": len(ttft), "seconds": total,
            "ttft_mean_ms": statistics.fmean(ttft), "ttft_median_ms": statistics.median(ttft),
            "ttft_p90_ms": ttft[int(0.9 * (len(ttft) - 1))],
            "prefix_cache_hit_rate": stats.prefix_cache_hits / max(1, stats.prefix_cache_queries)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-3-8b", help="a config in qoq/configs or a config.json path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens with chunking")
    p.add_argument("--batch", type=int, default=256, help="(a) running streams")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--budget-unchunked", type=int, default=8192, help="max_num_batched_tokens without chunking")
    p.add_argument("--steps", type=int, default=48, help="(a) timed steps")
    p.add_argument("--arrivals", type=int, default=4, help="(a) prompts arriving together...")
    p.add_argument("--arrival-every", type=int, default=8, help="(a) ...every this many steps")
    p.add_argument("--num-prefixes", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--num-questions", type=int, default=16)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256, help="(b) batch limit")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for prefill-chunking.json")
    args = p.parse_args(argv)
    cfg = bundled_config(args.config)
    quant = QuantConfig("w4a8kv4", G128)
    quant.qk_hadamard = True  # as `qoq quantize` makes it
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = random_model(cfg, quant, device=args.device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    result = {"config": args.config, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "args": vars(args), "step_times": [], "shared_prefix": []}
    for chunked in (True, False):
        result["step_times"].append(step_times(model, args, chunked, gen))
        gc.collect()
        print(json.dumps(result["step_times"][-1]), flush=True)
    for caching in (True, False):
        result["shared_prefix"].append(shared_prefix_ttft(model, args, caching, gen))
        gc.collect()
        print(json.dumps(result["shared_prefix"][-1]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill-chunking.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
