"""Time the RoPE + KV-write kernel (tokens per program, warps) at decode and prefill sizes, with
and without the q/k Hadamard; checks each against the reference first.

    python benchmarks/probe_rope.py --out $OUT/rope-probe.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import metadata, time_calls  # noqa: E402

from qoq.kernels.kv_cache import allocate_kv_cache, rope_kv_write_ref, rope_kv_write_triton  # noqa: E402

HQ, HKV, D = 32, 8, 128


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="*", default=[993, 8192])
    p.add_argument("--tok", type=int, nargs="*", default=[1, 2, 4, 8], help="tokens per program")
    p.add_argument("--warps", type=int, nargs="*", default=[4, 8])
    p.add_argument("--heads", type=int, nargs="*", default=[0], help="query heads per program (0: all)")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for t, had in itertools.product(args.tokens, (False, True)):
        qkv = torch.randn(t, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.float16, generator=gen)
        q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
        q, k, v = q.view(t, HQ, D), k.view(t, HKV, D), v.view(t, HKV, D)
        pos = torch.randint(0, 4000, (t,), device="cuda", generator=gen)
        inv = 1.0 / 500000 ** (torch.arange(0, D, 2, device="cuda") / D)
        f = torch.arange(4096, device="cuda")[:, None] * inv
        cs = torch.cat([f.cos(), f.sin()], 1)
        pages = -(-t // 64) + 1
        slots = torch.randperm(pages * 64, device="cuda", generator=gen)[:t]
        cache = allocate_kv_cache(1, pages, HKV, D, bits=4, device="cuda", qk_hadamard=had)[0]
        ref = rope_kv_write_ref(q, k, v, pos, cs, slots, allocate_kv_cache(1, pages, HKV, D, bits=4, device="cuda",
                                                                           qk_hadamard=had)[0])
        for tok, warps, heads, split in itertools.product(args.tok, args.warps, args.heads,
                                                          (True, False) if had else (True,)):
            opts = {"TOK": tok, "num_warps": warps, "SPLIT": split, "HEADS": heads or HQ}
            out = rope_kv_write_triton(q, k, v, pos, cs, slots, cache, options=opts)
            err = max(float((o.float() - r.float()).norm() / r.float().norm()) for o, r in zip(out, ref))
            ms = time_calls([lambda: rope_kv_write_triton(q, k, v, pos, cs, slots, cache, options=opts)])
            records.append({"tokens": t, "qk_hadamard": had, "TOK": tok, "num_warps": warps, "heads": heads or HQ,
                            "split": split, "median_ms": ms, "rel_err": err})
            print(f"t={t:5d} hadamard={had!s:5} TOK={tok} warps={warps} heads={heads or HQ} split={split!s:5}: "
                  f"{ms * 1e3:7.1f} us  "
                  f"err {err:.1e}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": metadata(sys.argv), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
