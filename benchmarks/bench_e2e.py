"""End-to-end serving throughput on the GPU (QServe protocol), against transformers and the roofline.

    python benchmarks/bench_e2e.py --config llama-3-8b --out $OUT/e2e-h100.json

For each precision: the largest batch whose KV cache fits (capped by --max-batch), input 1024,
output 512, EOS ignored, through the real engine (CUDA graphs on). Then transformers bf16
`generate` with a static cache at each of --hf-batches (an out-of-memory batch is skipped).
Ceilings are measured in the same run. The JSON is rewritten after every case, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.bench.hf_baseline import hf_throughput  # noqa: E402
from qoq.bench.roofline import Ceilings  # noqa: E402
from qoq.bench.throughput import run_throughput  # noqa: E402
from qoq.config import Granularity  # noqa: E402
from qoq.kernels import w8a8_gemm  # noqa: E402

CASES = [("w16a16kv16", -1), ("w8a8kv8", -1), ("w4a8kv8", 128), ("w4a8kv4", -1), ("w4a8kv4", 128)]


def measure_ceilings() -> Ceilings:
    import triton.testing

    n = 1 << 28  # 512 MiB fp16 per buffer: far beyond L2
    src, dst = torch.randn(n, device="cuda", dtype=torch.float16), torch.empty(n, device="cuda", dtype=torch.float16)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    a8 = torch.randint(-127, 128, (8192, 8192), device="cuda", dtype=torch.int8)
    scale8 = torch.full((8192,), 1e-4, device="cuda")
    # The int8 rate is the faster of cuBLAS and our own int8 kernel (the TMA one at this size,
    # faster than cuBLAS on the H100), so the roofline never takes a slower ceiling than we reach.
    int8_ms = min(triton.testing.do_bench(lambda: torch._int_mm(a8, a8.t()), return_mode="median"),
                  triton.testing.do_bench(lambda: w8a8_gemm(a8, scale8, a8, scale8.half()), return_mode="median"))
    ops = 2 * 8192**3
    del src, dst, a, a8
    torch.cuda.empty_cache()
    return Ceilings(copy_bytes_per_s=4 * n / (copy_ms * 1e-3), bf16_ops_per_s=ops / (bf16_ms * 1e-3),
                    int8_ops_per_s=ops / (int8_ms * 1e-3))


def metadata(args, ceilings: Ceilings) -> dict:
    commit = os.environ.get("QOQ_GIT_COMMIT")  # the device's copy of the tree may carry no git history
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
    commit = commit if re.fullmatch(r"[0-9a-f]{40}", commit or "") else None
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git_commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join(sys.argv), "config": args.config,
            "ceilings": {"copy_gbps": ceilings.copy_bytes_per_s / 1e9, "bf16_tflops": ceilings.bf16_ops_per_s / 1e12,
                         "int8_tops": ceilings.int8_ops_per_s / 1e12}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-3-8b")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--cases", default=",".join(f"{p}:{g}" for p, g in CASES),
                        help="precision:group_size[:batch] list (no batch: --batch); empty for none")
    parser.add_argument("--batch", type=int, default=0, help="0 = the largest that fits")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--hf-batches", default="64,128", help="empty to skip the transformers baseline")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the engine's token budget per step")
    parser.add_argument("--features", default="on", help="comma list of on|off: chunked prefill and prefix "
                        "caching (the engine's defaults) on, or both off, each case run once per entry")
    parser.add_argument("--prefill-graph-mode", default=None, choices=["piecewise", "full"],
                        help="EngineConfig.prefill_graph_mode (default: the engine's)")
    parser.add_argument("--out", default="e2e-h100.json")
    args = parser.parse_args()

    ceilings = measure_ceilings()
    report = {"meta": metadata(args, ceilings), "records": []}
    out = Path(args.out)

    def save(record: dict) -> None:
        report["records"].append(record)
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps(record), flush=True)

    features = [f.strip() for f in args.features.split(",") if f.strip()]
    if not set(features) <= {"on", "off"}:
        parser.error(f"--features takes on and off, got {args.features!r}")
    graph_mode = {"prefill_graph_mode": args.prefill_graph_mode} if args.prefill_graph_mode else {}
    cases = [(case, f) for case in filter(None, args.cases.split(",")) for f in features]
    for case, feature in cases:
        precision, group, *batch = case.split(":")  # an optional third field fixes the batch
        engine_args = {**graph_mode, **({} if feature == "on" else
                                        {"enable_chunked_prefill": False, "enable_prefix_caching": False})}
        try:
            result = run_throughput(args.config, precision, Granularity.parse(group), int(batch[0]) if batch else args.batch,
                                    args.input_len,
                                    args.output_len, "cuda", ceilings, max_batch=args.max_batch,
                                    max_num_batched_tokens=args.max_num_batched_tokens, engine_args=engine_args)
            save(result.to_dict())
        except Exception as err:  # one failing precision must not lose the others' numbers
            save({"system": "qoq", "precision": precision, "group_size": int(group), "error": repr(err)[:500]})
            del err
            gc.collect()  # the failed case's model and engine (a reference cycle) must not hold memory
            torch.cuda.empty_cache()
    for batch in filter(None, args.hf_batches.split(",")):
        try:
            save(hf_throughput(args.config, int(batch), args.input_len, args.output_len))
        except torch.OutOfMemoryError:
            save({"system": "hf-transformers", "batch": int(batch), "error": "out of memory"})
            torch.cuda.empty_cache()

    print(f"\n{'system':16} {'precision':11} {'g':>4} {'feat':>4} {'batch':>5} {'tok/s':>9} {'roof':>9} {'frac':>5} {'step ms':>8} {'fwd ms':>7}")
    for r in report["records"]:
        if "error" in r:
            print(f"{r['system']:16} {r.get('precision', ''):11} error: {r['error'][:80]}")
            continue
        roof = r.get("roofline_tokens_per_s")
        feat = {True: "on", False: "off"}.get(r.get("chunked_prefill"), "")
        print(f"{r['system']:16} {r['precision']:11} {r['group_size']:>4} {feat:>4} {r['batch']:>5} {r['tokens_per_s']:>9.0f} "
              f"{roof or 0:>9.0f} {r.get('roofline_fraction') or 0:>5.2f} {r.get('decode_step_ms', 0):>8.2f} "
              f"{r.get('decode_forward_ms', 0):>7.2f}")
        for kind, p in (r.get("phases") or {}).items():
            print(f"    {kind:12} {p['steps']:>5} steps {p['seconds']:>7.2f} s  {p['ms_per_step'] or 0:>7.2f} ms/step  "
                  f"prefill {p['prefill_tokens']:>8}  decode {p['decode_tokens']:>7}")


if __name__ == "__main__":
    main()
