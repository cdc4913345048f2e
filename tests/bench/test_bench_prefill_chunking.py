"""benchmarks/bench_prefill_chunking.py runs end to end on the CPU with a tiny config."""

import importlib.util
import json
from pathlib import Path

from tests.bench.test_throughput import TINY

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_prefill_chunking.py"


def test_bench_prefill_chunking_runs_on_cpu(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    spec = importlib.util.spec_from_file_location("bench_prefill_chunking", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--config", str(config), "--device", "cpu", "--page-size", "16", "--budget", "24", "--budget-unchunked", "128", "--arrivals", "2", "--arrival-every", "3",
                         "--batch", "3", "--prompt-len", "40", "--steps", "6", "--num-prefixes", "2",
                         "--prefix-len", "32", "--num-questions", "3", "--question-len", "8", "--output-len", "4",
                         "--max-num-seqs", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "prefill-chunking.json").read_text()) == json.loads(json.dumps(result))
    chunked, whole = result["step_times"]
    assert chunked["budget"] == 24 and whole["budget"] == 128
    # 2 prompts of 40 tokens every 3 steps: whole (80 tokens in one step) or split over the steps
    assert whole["mean_prefill_tokens_per_mixed_step"] == 80
    assert chunked["mean_prefill_tokens_per_mixed_step"] <= 24 - 3
    cached, uncached = result["shared_prefix"]
    assert cached["requests"] == uncached["requests"] == 6
    assert cached["prefix_cache_hit_rate"] > 0.4 and uncached["prefix_cache_hit_rate"] == 0
