"""Decode-attention option probe on the GPU: pages per iteration, warps, stages, at the batch sizes
that matter for the issues (batch 64 at ctx 1024 / 4096, issue 4's target; batch 1024 at ctx 1280,
the decode step of the end-to-end run at its largest batch). Checks every case against the
reference before timing (bench_attention.bench_decode) and writes JSON.

    python benchmarks/probe_decode.py --out $OUT/decode-probe.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import bench_decode  # noqa: E402
from bench_kernels import measure_ceilings, metadata  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cases", nargs="*", default=["64x1024", "64x4096", "1024x1280"])
    p.add_argument("--bits", type=int, nargs="*", default=[4])
    p.add_argument("--block-t", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--stages", type=int, nargs="*", default=[2, 3])
    p.add_argument("--maxnreg", type=int, nargs="*", default=[0], help="register cap per thread (0: none)")
    p.add_argument("--splits", type=int, nargs="*", default=[0], help="split-K programs per sequence (0: default)")
    p.add_argument("--biased", type=int, nargs="*", default=[0, 1], help="1: K codes kept as 1024 + code (BIASED, the default)")
    p.add_argument("--biased-v", type=int, nargs="*", default=[0], help="1: V codes kept as 1024 + code (BIASED_V)")
    p.add_argument("--skew", type=int, nargs="*", default=[0], help="1: the next block's scores alongside this one's softmax (SKEW)")
    p.add_argument("--chains", type=int, nargs="*", default=[1], help="> 1: that many chains per program (CHAINS)")
    p.add_argument("--swap", type=int, nargs="*", default=[0], help="1: the transposed kernel (tokens as the MMA's M)")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    copy_bw = measure_ceilings()["copy_gbps"]
    records = []
    for case, bits in itertools.product(args.cases, args.bits):
        batch, ctx = map(int, case.split("x"))
        grid = itertools.product(args.block_t, args.warps, args.stages, args.maxnreg, args.splits, args.biased,
                                 args.swap, args.biased_v, args.skew, args.chains)
        for block_t, warps, stages, maxnreg, splits, biased, swap, biased_v, skew, chains in grid:
            opts = dict(BLOCK_T=block_t, num_warps=warps, NUM_STAGES=stages)
            opts["BIASED"] = bool(biased)
            opts["SWAP"] = bool(swap)
            if biased_v:
                opts["BIASED_V"] = True
            if skew:
                opts["SKEW"] = True
            if chains > 1:
                opts["CHAINS"] = chains
            if maxnreg:
                opts["maxnreg"] = maxnreg
            rec = {"bits": bits, "batch": batch, "context": ctx, "options": opts, "num_splits": splits or None}
            try:
                ms, nbytes, err = bench_decode(batch, ctx, bits, gen, splits or None, opts)
                rec.update(median_ms=ms, gbps=nbytes / ms / 1e6, bandwidth_fraction=nbytes / ms / 1e6 / copy_bw,
                           rel_err=err)
            except Exception as e:  # a config that does not compile or fit is a result too
                rec["error"] = str(e)[:200]
            records.append(rec)
            torch.cuda.empty_cache()
        ok = sorted((r for r in records if r["batch"] == batch and r["context"] == ctx and r["bits"] == bits
                     and "median_ms" in r), key=lambda r: r["median_ms"])
        base = next((r for r in ok if r["options"] == dict(BLOCK_T=64, num_warps=1, NUM_STAGES=2, BIASED=False)
                     and not r["num_splits"]), None)
        print(f"kv{bits} b{batch} ctx{ctx}: default {base['median_ms'] * 1e3:.1f} us "
              f"({base['bandwidth_fraction']:.2f})" if base else f"kv{bits} b{batch} ctx{ctx}", flush=True)
        for r in ok[:5]:
            print(f"   {r['median_ms'] * 1e3:8.1f} us {r['bandwidth_fraction']:5.2f} {r['options']} "
                  f"splits={r['num_splits'] or 'default'}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": metadata(sys.argv), "copy_gbps": copy_bw, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
