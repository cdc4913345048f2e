"""Decode attention benchmark over the paged cache (BENCHMARKS.md protocol).

KV4 / KV8 / fp16 paged decode (our Triton kernel) against PyTorch SDPA over contiguous fp16 KV,
batch 16/64/256, context 512/1024/4096, 32 query heads, 8 KV heads, head dim 128, page 64.
GB/s counts the bytes the kernel must read: KV payload + scales/zeros + page table + q/out.
Each case is checked against the torch reference (on the first 8 sequences) before timing.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bars import attention_bars, format_bars  # noqa: E402
from bench_kernels import copies_for, measure_ceilings, metadata, time_calls  # noqa: E402

from qoq.kernels.decode_attention import (  # noqa: E402
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from qoq.kernels.kv_cache import allocate_kv_cache  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 64


def random_cache(num_pages, bits, gen, num_kv_heads=HKV, head_dim=D, page_size=PAGE, device="cuda"):
    """One layer's paged cache of random codes (or fp16 values) and scales / zeros."""
    cache = allocate_kv_cache(1, num_pages, num_kv_heads, head_dim, page_size=page_size, bits=bits,
                              device=device)[0]
    for name in ("k_cache", "v_cache"):
        t = getattr(cache, name)
        if bits == 16:
            t.normal_(generator=gen)
        else:
            t.random_(0, 256, generator=gen)
    for name in ("k_scale", "v_scale"):
        if getattr(cache, name) is not None:
            getattr(cache, name).uniform_(0.01, 0.1, generator=gen)
            getattr(cache, name.replace("scale", "zero")).uniform_(-1.0, 0.0, generator=gen)
    return cache


def kv_bytes(batch, ctx, bits):
    tokens = batch * ctx
    payload = 2 * tokens * HKV * D * bits // 8
    meta = 0 if bits == 16 else 2 * 2 * tokens * HKV * 2
    return payload + meta + batch * (ctx // PAGE) * 4 + 2 * batch * HQ * D * 2


def bench_decode(batch, ctx, bits, gen, num_splits=None, options=None):
    pages = ctx // PAGE
    nbytes = kv_bytes(batch, ctx, bits)
    sets = []
    for _ in range(copies_for(nbytes)):
        cache = random_cache(batch * pages, bits, gen)
        bt = torch.randperm(batch * pages, device="cuda", generator=gen).reshape(batch, pages).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.float16, generator=gen)
        sets.append((q, cache, bt, lens))
    q, cache, bt, lens = sets[0]
    n = min(batch, 8)
    out = paged_decode_attention_triton(q, cache, bt, lens, D ** -0.5, num_splits=num_splits,
                                        options=options)[:n]
    ref = paged_decode_attention_ref(q[:n], cache, bt[:n], lens[:n], D ** -0.5)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    if not err < 5e-3:
        raise AssertionError(f"decode kv{bits} b{batch} ctx{ctx}: rel err {err:.3g}")
    ms = time_calls([lambda s=s: paged_decode_attention_triton(*s, D ** -0.5, num_splits=num_splits,
                                                               options=options) for s in sets])
    return ms, nbytes, err


def bench_sdpa(batch, ctx, gen):
    nbytes = kv_bytes(batch, ctx, 16)
    sets = []
    for _ in range(copies_for(nbytes)):
        k = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.float16, generator=gen)
        v = torch.randn_like(k)
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.float16, generator=gen)
        sets.append((q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = time_calls([lambda s=s: sdpa(*s, enable_gqa=True) for s in sets])
    return ms, nbytes


def sweep(args, gen):
    import itertools

    out = []
    for ctx, bits in itertools.product((1024, 4096), (4, 8)):
        grid = itertools.product((64,), (True, False), (1, 2, 4), (2, 3), (None, "x2"))
        for block_t, fast, warps, stages, splits in grid:
            opts = dict(BLOCK_T=block_t, FAST=fast, num_warps=warps, NUM_STAGES=stages)
            ns = None
            if splits == "x2":
                from qoq.kernels.decode_attention import decode_plan, decode_splits
                plan = decode_plan(bits, torch.device("cuda")).with_options(opts)
                ns = 2 * decode_splits(plan, 64, HKV, ctx // block_t, torch.device("cuda"))
            rec = {"bits": bits, "context": ctx, "options": opts, "num_splits": ns}
            try:
                rec["median_ms"], nbytes, rec["rel_err"] = bench_decode(64, ctx, bits, gen, ns, opts)
                rec["gbps"] = nbytes / rec["median_ms"] / 1e6
            except Exception as e:
                rec["error"] = str(e)[:200]
            out.append(rec)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for ctx, bits in itertools.product((1024, 4096), (4, 8)):
        ok = sorted((r for r in out if r["context"] == ctx and r["bits"] == bits and "median_ms" in r),
                    key=lambda r: r["median_ms"])
        for r in ok[:4]:
            print(f"kv{bits} ctx{ctx} {r['median_ms'] * 1e3:7.1f} us {r['gbps']:6.0f} GB/s "
                  f"{r['options']} splits={r['num_splits']}")
        errs = [r for r in out if r["context"] == ctx and r["bits"] == bits and "error" in r]
        print(f"  {len(errs)} errors", errs[:1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/attention-h100.json")
    p.add_argument("--batches", type=int, nargs="*", default=[16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="*", default=[512, 1024, 4096])
    p.add_argument("--sweep", action="store_true", help="time kernel options at batch 64 only")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    if args.sweep:
        return sweep(args, gen)
    ceilings = measure_ceilings()
    copy_bw = ceilings["copy_gbps"]
    records, errors = [], []
    for batch in args.batches:
        for ctx in args.contexts:
            try:
                ms, nbytes = bench_sdpa(batch, ctx, gen)
                gbps = nbytes / ms / 1e6
                sdpa_ms = ms
                records.append({"kernel": "sdpa_fp16", "batch": batch, "context": ctx,
                                "median_ms": ms, "gbps": gbps, "bandwidth_fraction": gbps / copy_bw})
            except Exception as e:
                traceback.print_exc()
                sdpa_ms = None
                errors.append({"kernel": "sdpa_fp16", "batch": batch, "context": ctx, "error": str(e)[:300]})
            for bits in (4, 8, 16):
                name = {4: "decode_kv4", 8: "decode_kv8", 16: "decode_fp16"}[bits]
                for splits in [None]:
                    try:
                        ms, nbytes, err = bench_decode(batch, ctx, bits, gen, splits)
                        gbps = nbytes / ms / 1e6
                        rec = {"kernel": name, "batch": batch, "context": ctx, "median_ms": ms,
                               "gbps": gbps, "bandwidth_fraction": gbps / copy_bw, "rel_err": err,
                               "speedup_vs_sdpa_fp16": sdpa_ms / ms if sdpa_ms else None}
                        if splits:
                            rec["num_splits"] = splits
                        records.append(rec)
                    except Exception as e:
                        traceback.print_exc()
                        errors.append({"kernel": name, "batch": batch, "context": ctx, "error": str(e)[:300]})
                torch.cuda.empty_cache()
            print(f"done batch={batch} ctx={ctx}", flush=True)
    result = {"meta": metadata(sys.argv), "ceilings": ceilings, "records": records, "errors": errors,
              "bars": attention_bars(records)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ncopy bandwidth {copy_bw:.0f} GB/s")
    print(f"{'kernel':<13}{'batch':>6}{'ctx':>6}{'splits':>7}{'us':>9}{'GB/s':>8}{'frac':>6}{'vs sdpa':>8}")
    for r in records:
        sp = r.get("speedup_vs_sdpa_fp16")
        print(f"{r['kernel']:<13}{r['batch']:>6}{r['context']:>6}{r.get('num_splits', '-'):>7}"
              f"{r['median_ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['bandwidth_fraction']:>6.2f}"
              f"{(f'{sp:.2f}' if sp else '-'):>8}")
    print("\n".join(format_bars(result["bars"])))
    print("errors:", errors or "none")


if __name__ == "__main__":
    main()
