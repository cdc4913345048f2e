"""Time and memory of `qoq quantize` at real model shapes, as a user runs it.

For each case a random-weight HF folder (bf16 shards, synthetic tokenizer, qoq/bench/random_hf.py)
is written, then `qoq quantize FOLDER --out CKPT --calib TEXT` runs in its own process with all
other options at their defaults; the checkpoint's quantize_report.json gives the seconds per
step and the peak GPU / host memory of that process. A case `NAME:8,16` generates the deepest
folder once and quantizes views of its first 8 and 16 layers (to show memory flat and time
linear in depth for a model whose full folder would not fit the disk). `smollm2-135m` quantizes
the bundled model itself. Records go to --out (merged into an existing file by case).

    python benchmarks/bench_quantize.py --case llama-3-8b --case qwen1.5-72b:8,16 --out quantize-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.bench.random_hf import random_text, truncated_view, write_random_hf_folder  # noqa: E402
from qoq.bench.random_model import bundled_config  # noqa: E402


def run_quantize(model: str, out: Path, calib: Path | None, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "qoq", "quantize", model, "--out", str(out), "--overwrite", *extra]
    if calib is not None:
        cmd += ["--calib", str(calib)]
    env = {**os.environ, "TQDM_MININTERVAL": "20"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    report = json.loads((out / "quantize_report.json").read_text())
    report["wall_seconds"] = round(wall, 1)
    return report


def record(name: str, report: dict, layers: int, full_layers: int) -> dict:
    opts = report["options"]
    return {"config": name, "layers": layers, "full_layers": full_layers, "precision": report["precision"],
            "group_size": report["group_size"], "gptq": opts["gptq"], "seconds": report["seconds"],
            "wall_seconds": report["wall_seconds"], "step_seconds": report["step_seconds"],
            "peak_gpu_gib": report["peak_gpu_gib"], "peak_host_gib": report["peak_host_gib"],
            "checkpoint_gib": report["checkpoint_gib"], "calib_tokens": report["calib_tokens"],
            "device": report["device_name"], "threads": report["threads"], "git_commit": _commit()}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"


def run_case(case: str, work: Path, extra: list[str]):
    """Yield a record per depth as soon as it is measured."""
    name, _, depths = case.partition(":")
    if name == "smollm2-135m":
        rep = run_quantize(name, work / "ckpt", None, extra)
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        yield record(name, rep, rep["layers"], rep["layers"])
        return
    config = bundled_config(name)
    full = config.num_layers
    layers = sorted(int(d) for d in depths.split(",")) if depths else [full]
    folder = work / f"{Path(name).stem}-hf"
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_random_hf_folder(config, folder, num_layers=max(layers), device=device)
    print(f"{name}: wrote a random {max(layers)}-layer folder in {time.perf_counter() - t0:.0f}s", flush=True)
    calib = work / "calib.txt"
    calib.write_text(random_text(80_000, config.vocab_size))
    try:
        for n in layers:
            view = truncated_view(folder, work / f"view-{n}", n) if n != max(layers) else folder
            rep = run_quantize(str(view), work / "ckpt", calib, extra)
            shutil.rmtree(work / "ckpt", ignore_errors=True)
            if view != folder:
                shutil.rmtree(view, ignore_errors=True)
            rec = record(name if not name.endswith(".json") else Path(name).stem, rep, n, full)
            print(json.dumps(rec), flush=True)
            yield rec
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", required=True,
                   help="a bundled config (or config.json path), optionally :DEPTH[,DEPTH] layers; or smollm2-135m")
    p.add_argument("--work", default="/tmp/qoq-bench-quantize", help="scratch folder (needs the model's size on disk)")
    p.add_argument("--out", required=True, help="results JSON (records of the same case are replaced)")
    p.add_argument("--quantize-arg", action="append", default=[], help="extra argument for qoq quantize")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    for case in args.case:
        for new in run_case(case, work, args.quantize_arg):
            key = (new["config"], new["layers"], new["device"])
            records = [r for r in records if (r["config"], r["layers"], r["device"]) != key] + [new]
            out.write_text(json.dumps({"benchmark": "benchmarks/bench_quantize.py", "records": records}, indent=1))
    print(f"{'config':<14}{'layers':>7}{'seconds':>9}{'GPU GiB':>9}{'host GiB':>9}  device")
    for r in records:
        print(f"{r['config']:<14}{r['layers']:>7}{r['seconds']:>9.1f}{r['peak_gpu_gib'] or 0:>9.1f}"
              f"{r['peak_host_gib']:>9.1f}  {r['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
