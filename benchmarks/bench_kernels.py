"""GEMM kernel benchmark on the shapes of Llama-3-8B (BENCHMARKS.md protocol).

Every case is checked against its torch reference on fresh random data before it is timed.
Timing: the calls are captured in a CUDA graph, rotating over enough weight copies that the
weights never sit in L2 (>= 4x its size), and the median over graph replays is divided by the
number of calls. Baselines (cuBLAS bf16 / int8 / fp8) are timed the same way in the same run.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels-h100.json [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))

from bars import format_bars, gemm_bars  # noqa: E402
from helpers import (  # noqa: E402
    g128_weights,
    per_channel_weights,
    random_activations,
    rel_err,
    w8_weights,
)

from qoq.kernels import int_gemm  # noqa: E402
from qoq.kernels.w4a8_gemm import (  # noqa: E402
    w4a8_g128_gemm_ref,
    w4a8_g128_gemm_triton,
    w4a8_per_channel_gemm_ref,
    w4a8_per_channel_gemm_triton,
)
from qoq.kernels.w8a8_gemm import w8a8_gemm_ref, w8a8_gemm_triton  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 64, 128, 256, 512, 1024, 4096]
ROTATE_BYTES = 256 << 20


def git_commit() -> str | None:
    """The caller's QOQ_GIT_COMMIT first: the device tool's copy of the tree may carry a stale .git."""
    if os.environ.get("QOQ_GIT_COMMIT"):
        return os.environ["QOQ_GIT_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__))
    except Exception:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def metadata(argv) -> dict:
    commit = git_commit()
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + argv),
    }


WARMUP_MS = 25.0
MEASURE_MS = 100.0


def time_calls(calls, reps: int = 25) -> float:
    """Median milliseconds per call of `calls` (a list of closures over rotated buffers), from
    CUDA-graph replays of all of them: ~WARMUP_MS of untimed replays, then `reps` timed ones or
    as many as fill ~MEASURE_MS, whichever is more."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # compile / create handles outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    # Warm up for ~25 ms of replays (as triton.testing.do_bench does): the first case timed after
    # a shape's weight sets were generated otherwise read up to 15% slow (cuBLAS bf16 and ours alike).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    for _ in range(min(1000, int(WARMUP_MS / once))):
        graph.replay()
    torch.cuda.synchronize()
    # at least ~MEASURE_MS of replays, so that a slow spell of a few ms (seen as single cases
    # 20-60% slow in otherwise equal runs) moves the median little
    reps = max(reps, min(2000, int(MEASURE_MS / once)))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def copies_for(nbytes: int) -> int:
    return max(1, min(32, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def measure_ceilings() -> dict:
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    ms = time_calls([lambda: dst.copy_(buf)], reps=10)
    src16, dst16 = buf.view(torch.float16), dst.view(torch.float16)
    ms_kernel = time_calls([lambda: torch.mul(src16, 1.0, out=dst16)], reps=10)
    out = {"copy_gbps": 2 * buf.numel() / min(ms, ms_kernel) / 1e6,
           "memcpy_gbps": 2 * buf.numel() / ms / 1e6, "elementwise_copy_gbps": 2 * buf.numel() / ms_kernel / 1e6}
    del buf, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out["bf16_8192_tflops"] = 2 * n ** 3 / time_calls([lambda: a @ a], 10) / 1e9
    a8 = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
    out["int8_8192_tops"] = 2 * n ** 3 / time_calls([lambda: torch._int_mm(a8, a8.t())], 10) / 1e9
    scale8 = torch.full((n,), 1e-4, device="cuda")
    out["qoq_w8a8_8192_tops"] = 2 * n ** 3 / time_calls([lambda: w8a8_gemm_triton(a8, scale8, a8, scale8.half())], 10) / 1e9
    f8 = a.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    out["fp8_8192_tflops"] = 2 * n ** 3 / time_calls(
        [lambda: torch._scaled_mm(f8, f8.t(), one, one, out_dtype=torch.bfloat16)], 10) / 1e9
    return out


def weight_sets(n, k, gen):
    """Weights of each kernel, enough copies to rotate out of L2; built once per shape on the GPU."""
    def copies(builder, nbytes):
        return [builder(n, k, "cuda", gen) for _ in range(copies_for(nbytes))]

    return {"w4a8_g128": copies(g128_weights, n * k // 2),
            "w4a8_per_channel": copies(per_channel_weights, n * k // 2),
            "w8a8": copies(w8_weights, n * k)}


KERNELS = {
    "w4a8_g128": (w4a8_g128_gemm_triton, w4a8_g128_gemm_ref, False),
    "w4a8_per_channel": (w4a8_per_channel_gemm_triton, w4a8_per_channel_gemm_ref, True),
    "w8a8": (w8a8_gemm_triton, w8a8_gemm_ref, False),
}


MODE_OF = {"w4a8_g128": int_gemm.MODE_W4_G128, "w4a8_per_channel": int_gemm.MODE_W4_PER_CHANNEL,
           "w8a8": int_gemm.MODE_W8}


def case_args(name, m, k, weights, gen):
    """Argument tuples for each weight copy, with fresh activations."""
    x8, sx, xsum = random_activations(m, k, "cuda", gen)
    act = (x8, sx, xsum) if KERNELS[name][2] else (x8, sx)
    return [act + w for w in weights]


def baselines(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    c = copies_for(2 * n * k)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(c)]
    res = {"bf16_cublas": time_calls([lambda w=w: x @ w.t() for w in ws])}
    x8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    try:
        w8s = [w.to(torch.int8) for w in ws]
        res["int8_cublas"] = time_calls([lambda w=w: torch._int_mm(x8, w.t()) for w in w8s])
    except Exception as e:  # _int_mm rejects M <= 16
        res["int8_cublas"] = f"unsupported: {str(e).splitlines()[0][:80]}"
    try:
        xf, one = x.to(torch.float8_e4m3fn), torch.ones((), device="cuda")
        wfs = [w.to(torch.float8_e4m3fn) for w in ws]
        res["fp8_cublas"] = time_calls(
            [lambda w=w: torch._scaled_mm(xf, w.t(), one, one, out_dtype=torch.bfloat16) for w in wfs])
    except Exception as e:
        res["fp8_cublas"] = f"unsupported: {str(e).splitlines()[0][:80]}"
    return res


def sweep_configs(m):
    """Candidate tiles per M bucket, both operand orders (SWAP=True: weight tile is the A side)."""
    if m <= 16:
        swap = [dict(BLOCK_M=16, BLOCK_N=bn, num_warps=4, num_stages=4, SPLIT_K=sk, SWAP=True)
                for bn in (32, 64, 128) for sk in (1, 2, 4, 8)]
        return swap + [dict(BLOCK_M=16, BLOCK_N=bn, num_warps=4, num_stages=4, SPLIT_K=sk, SWAP=False)
                       for bn in (64, 128) for sk in (1, 4)]
    if m <= 64:
        return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=4, SPLIT_K=sk, SWAP=sw)
                for bm in (32, 64) for bn in (64, 128) for sk in (1, 2) for sw in (True, False)]
    tiles = [(64, 128), (128, 64), (128, 128), (256, 64), (64, 256), (128, 256), (256, 128)]
    splits = (1,)
    if m > 256:
        tiles, splits = [(128, 128), (128, 256), (256, 128), (128, 64)], (1, 2)
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if bm * bn <= 128 * 128 else 8, num_stages=s,
                 SPLIT_K=sk, SWAP=sw)
            for bm, bn in tiles for s in (3, 4) for sw in ((True,) if m > 256 else (True, False)) for sk in splits]


def sweep(gen, seconds: float, ms=(16, 256, 64, 1024)) -> list:
    """Time a grid of tile configs for the W4A8 kernels, the target sizes first, until a deadline."""
    import time

    deadline, out = time.time() + seconds, []
    for m in ms:
        for n, k in SHAPES:
            wsets = weight_sets(n, k, gen)
            for name in ("w4a8_g128", "w4a8_per_channel"):
                fn = KERNELS[name][0]
                sets = case_args(name, m, k, wsets[name], gen)
                for cfg in sweep_configs(m):
                    if time.time() > deadline:
                        return out
                    rec = {"kernel": name, "M": m, "N": n, "K": k, "config": cfg}
                    try:
                        rec["median_ms"] = time_calls([lambda a=a: fn(*a, config=cfg) for a in sets], reps=10)
                    except Exception as e:
                        rec["error"] = str(e)[:200]
                    out.append(rec)
            del wsets
    return out


def run(args) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    records, errors, sweeps = [], [], []
    ceilings = measure_ceilings()
    print("ceilings", ceilings, flush=True)
    for n, k in SHAPES if args.ms else []:
        wsets = weight_sets(n, k, gen)
        for m in args.ms:
            base = baselines(m, n, k)
            for name, val in base.items():
                rec = {"kernel": name, "M": m, "N": n, "K": k}
                if isinstance(val, float):
                    rec.update(median_ms=val, tops=2 * m * n * k / val / 1e9)
                else:
                    rec.update(median_ms=None, tops=None, note=val)
                records.append(rec)
            bf16 = base["bf16_cublas"]
            for name, (fn, ref, _) in KERNELS.items():
                try:
                    sets = case_args(name, m, k, wsets[name], gen)
                    err = rel_err(fn(*sets[0]), ref(*sets[0]))  # fresh data, checked before timing
                    if not err < 2e-3:
                        raise AssertionError(f"rel err {err:.3g}")
                    ms = time_calls([lambda a=a: fn(*a) for a in sets])
                    records.append({"kernel": name, "M": m, "N": n, "K": k, "median_ms": ms,
                                    "tops": 2 * m * n * k / ms / 1e9, "vs_bf16": bf16 / ms,
                                    "rel_err": err,
                                    "plan": int_gemm.gemm_plan(m, n, k, MODE_OF[name], torch.device("cuda")).to_json()})
                    del sets
                except Exception as e:
                    traceback.print_exc()
                    errors.append({"kernel": name, "M": m, "N": n, "K": k, "error": str(e)[:300]})
            torch.cuda.empty_cache()
            print(f"done N={n} K={k} M={m}", flush=True)
        del wsets
    if args.sweep:
        sweeps = sweep(gen, args.sweep_seconds, args.sweep_ms)
    best = {}
    for r in sweeps:
        key = f"{r['kernel']}/M={r['M']}/N={r['N']}/K={r['K']}"
        if "median_ms" in r and (key not in best or r["median_ms"] < best[key]["median_ms"]):
            best[key] = {"median_ms": r["median_ms"], "config": r["config"]}
    summary = summarize(records)
    return {"meta": metadata(sys.argv), "ceilings": ceilings, "records": records, "errors": errors,
            "summary": summary, "bars": gemm_bars(summary), "sweep_best": best, "sweeps": sweeps}


def summarize(records) -> dict:
    """Geometric mean over the four shapes of bf16_time / kernel_time, per kernel and M."""
    by = {(r["kernel"], r["M"], r["N"], r["K"]): r for r in records}
    out = {}
    for kern in ("w4a8_g128", "w4a8_per_channel", "w8a8", "int8_cublas", "fp8_cublas"):
        for m in MS:
            ratios = []
            for n, k in SHAPES:
                r, b = by.get((kern, m, n, k)), by.get(("bf16_cublas", m, n, k))
                if r and b and r.get("median_ms") and b.get("median_ms"):
                    ratios.append(b["median_ms"] / r["median_ms"])
            if len(ratios) == len(SHAPES):
                out[f"{kern}/M={m}"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/kernels-h100.json")
    p.add_argument("--sweep", action="store_true", help="also time a grid of tile configs")
    p.add_argument("--sweep-seconds", type=float, default=240)
    p.add_argument("--ms", type=int, nargs="*", default=MS)
    p.add_argument("--sweep-ms", type=int, nargs="*", default=[16, 256, 64, 1024], help="M values the sweep tunes")
    args = p.parse_args()
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'speedup vs cuBLAS bf16 (geomean of 4 shapes)':<48}")
    ms = sorted({int(key.split('=')[1]) for key in result["summary"]})
    print(f"{'kernel':<18}" + "".join(f"{'M=' + str(m):>9}" for m in ms))
    for kern in ("w4a8_g128", "w4a8_per_channel", "w8a8", "int8_cublas", "fp8_cublas"):
        row = [result["summary"].get(f"{kern}/M={m}") for m in ms]
        print(f"{kern:<18}" + "".join(f"{v:>9.2f}" if v else f"{'-':>9}" for v in row))
    print("\n".join(format_bars(result["bars"])))
    for key, b in result["sweep_best"].items():
        print(f"best {key}: {b['median_ms'] * 1e3:.1f} us {b['config']}")
    print("errors:", result["errors"] or "none")


if __name__ == "__main__":
    main()
