"""How much of the GPU the KV cache gets, with CUDA graphs and without (GPU script).

The runner sizes the cache after a probe of the largest eager step (its activation peak is kept
free), then captures the piecewise prefill graphs and the decode graphs into that reserve. This
prints, for a random Llama-3-8B-shaped w4a8kv4 model at the serve defaults, the pages each engine
got, the graphs' memory, what is left free, and the peak reserved while a full token budget of
prompts runs next to decodes: with graphs on, the pages should match the eager engine's (the
reserve counted once) and the peak stay within gpu_memory_utilization.

    python benchmarks/probe_kv_sizing.py --out kv-sizing-h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="llama-3-8b")
    p.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cfg = bundled_config(args.config)
    model = random_model(cfg, QuantConfig("w4a8kv4", G128, qk_hadamard=True), device="cuda", dtype=torch.float16)
    total = torch.cuda.mem_get_info()[1]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for eager in (True, False):
        t0 = time.perf_counter()
        engine = LLMEngine(model, None, EngineConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget, max_model_len=args.max_model_len,
            enforce_eager=eager))
        start_s = time.perf_counter() - t0
        runner = engine.runner
        torch.cuda.reset_peak_memory_stats()
        # a full budget of 1024-token prompts arriving while others decode: the largest mixed steps
        prompts = [torch.randint(0, cfg.vocab_size, (1024,), generator=gen).tolist() for _ in range(24)]
        params = SamplingParams(max_tokens=32, ignore_eos=True, detokenize=False)
        for i, ids in enumerate(prompts):
            engine.add_request(ids, params, request_id=str(i))
        done = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = len(o.token_ids)
        assert sorted(done.values()) == [32] * len(prompts), done
        free = torch.cuda.mem_get_info()[0]
        row = {
            "graphs": not eager,
            "num_pages": runner.num_pages,
            "kv_tokens": runner.num_pages * engine.config.page_size,
            "prefill_graphs_gib": round(getattr(runner.prefill_graphs, "memory_bytes", 0) / 2**30, 3),
            "decode_graphs_gib": round(getattr(runner.graphs, "memory_bytes", 0) / 2**30, 3),
            "prefill_graphs_captured": runner.prefill_graphs is not None,
            "decode_graphs_captured": runner.graphs is not None,
            "peak_reserved_frac": round((torch.cuda.max_memory_reserved() + (total - free - torch.cuda.memory_reserved()))
                                        / total, 4),
            "free_after_gib": round(free / 2**30, 2),
            "start_s": round(start_s, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
    record = {"benchmark": "probe_kv_sizing", "device": torch.cuda.get_device_name(), "config": args.config,
              "budget": args.budget, "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
              "gpu_memory_utilization": EngineConfig().gpu_memory_utilization, "total_gib": round(total / 2**30, 1),
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
