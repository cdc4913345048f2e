"""The kernel bars a GPU's results are held to (issue 22), checked from the benchmarks' JSON.

GEMMs (bench_kernels.py's summary: geomean over Llama-3-8B's four shapes of bf16 time / kernel
time): W4A8, g128 and per-channel, at least 2.5x cuBLAS bf16 at M = 1 and 16 and at least 90% of
FP8 cuBLAS's speed (measured in the same run) at M = 256 and 1024. Decode attention
(bench_attention.py's records): KV4 at batch 64 at least 80% of copy bandwidth at contexts 1,024
and 4,096.

    python benchmarks/bars.py benchmarks/results/kernels-h200.json benchmarks/results/attention-h200.json
"""

from __future__ import annotations

import argparse
import json

W4A8 = ("w4a8_g128", "w4a8_per_channel")
VS_BF16 = {1: 2.5, 16: 2.5}  # M -> least speedup over cuBLAS bf16
VS_FP8 = {256: 0.9, 1024: 0.9}  # M -> least fraction of FP8 cuBLAS's speed
KV4_BATCH = 64
KV4_BANDWIDTH = {1024: 0.8, 4096: 0.8}  # context -> least fraction of copy bandwidth


def _bar(value: float, bar: float, of: str) -> dict:
    return {"value": round(value, 3), "bar": bar, "of": of, "met": value >= bar}


def gemm_bars(summary: dict) -> dict:
    """{"<kernel>/M=<m>": {value, bar, of, met}} for the points `summary` holds."""
    out = {}
    for kernel in W4A8:
        for m, bar in VS_BF16.items():
            value = summary.get(f"{kernel}/M={m}")
            if value:
                out[f"{kernel}/M={m}"] = _bar(value, bar, "bf16_cublas")
        for m, bar in VS_FP8.items():
            value, fp8 = summary.get(f"{kernel}/M={m}"), summary.get(f"fp8_cublas/M={m}")
            if value and fp8:
                out[f"{kernel}/M={m}"] = _bar(value / fp8, bar, "fp8_cublas")
    return out


def attention_bars(records: list) -> dict:
    """{"decode_kv4/batch=64/context=<c>": {value, bar, of, met}} for the records present."""
    out = {}
    for r in records:
        bar = KV4_BANDWIDTH.get(r.get("context"))
        if r.get("kernel") == "decode_kv4" and r.get("batch") == KV4_BATCH and bar and r.get("bandwidth_fraction"):
            out[f"decode_kv4/batch={KV4_BATCH}/context={r['context']}"] = _bar(r["bandwidth_fraction"], bar, "copy")
    return out


def format_bars(bars: dict) -> list[str]:
    return [f"{key:<36} {b['value']:>6.2f} of {b['of']:<12} bar {b['bar']:<4} {'met' if b['met'] else 'NOT met'}"
            for key, b in bars.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench_kernels.py / bench_attention.py JSON files")
    args = p.parse_args(argv)
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        bars = gemm_bars(result["summary"]) if "summary" in result else attention_bars(result.get("records", []))
        device = result.get("meta", {}).get("device", "")
        print(f"{path} ({device})")
        for line in format_bars(bars) or ["no points of the bars"]:
            print("  " + line)


if __name__ == "__main__":
    main()
