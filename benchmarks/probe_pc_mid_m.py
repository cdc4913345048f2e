"""Probe: per-channel W4A8 at 256 < M <= 768 (decode batches), register-A kernel vs the TMA kernel.

Shapes of Llama-3-8B and Llama-2-70B; every config checked against the reference first.
    python benchmarks/probe_pc_mid_m.py --out $OUT/pc-mid.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))

from helpers import per_channel_case, rel_err  # noqa: E402

from qoq.kernels import int_gemm  # noqa: E402
from qoq.kernels.w4a8_gemm import w4a8_per_channel_gemm_ref, w4a8_per_channel_gemm_triton  # noqa: E402

SHAPES = {"llama-3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
          "llama-2-70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]}
TMA = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=4, TMA=True) for bm, bn in ((128, 128), (128, 64), (64, 128))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="262,512,768")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    records = []
    for model, shapes in SHAPES.items():
        for m in [int(x) for x in args.ms.split(",")]:
            for n, k in shapes:
                case = per_channel_case(m, n, k, "cuda", gen)
                want = w4a8_per_channel_gemm_ref(*case)
                for name, cfg in [("default", None)] + [(f"tma_{c['BLOCK_M']}x{c['BLOCK_N']}", c) for c in TMA]:
                    fn = lambda cfg=cfg: w4a8_per_channel_gemm_triton(*case, config=cfg)  # noqa: E731
                    err = rel_err(fn(), want)
                    if not err < 2e-3:
                        print(model, m, n, k, name, "WRONG", err)
                        continue
                    us = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
                    records.append(dict(model=model, M=m, N=n, K=k, config=name, us=us,
                                        default=int_gemm.default_config(m, n, k, 2, tma=True) if cfg is None else cfg))
                    print(f"{model} M={m} N={n} K={k} {name:12s} {us:8.1f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), records=records), indent=1))


if __name__ == "__main__":
    main()
