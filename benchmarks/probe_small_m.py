"""Small-M (decode-size) W4A8 GEMM probe on the GPU: chunks per loop iteration (UNROLL), tile
width and split-K around the M<=16 default, for the four Llama-3-8B shapes. Each config is
checked against the reference before timing; prints the best per case and writes JSON.

    python benchmarks/probe_small_m.py --out $OUT/small-m-probe.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import (  # noqa: E402
    KERNELS, MODE_OF, SHAPES, case_args, measure_ceilings, metadata, rel_err, time_calls, weight_sets,
)

from qoq.kernels import int_gemm  # noqa: E402


def variants(m, n, k, mode):
    """The default first, then tile width x split-K x chunks per iteration around it."""
    base = int_gemm.default_config(m, n, k, mode, tma=False)
    out = [dict(base)]
    for bn in (64, 128):
        for split in sorted({max(1, base["SPLIT_K"] // 2), base["SPLIT_K"], base["SPLIT_K"] * 2}):
            for unroll in (1, 2):
                per = -(-(k // 128) // split)
                if per % unroll or (k // 128) % per % unroll:
                    continue
                cfg = dict(base, BLOCK_N=bn, SPLIT_K=split, UNROLL=unroll)
                if cfg not in out:
                    out.append(cfg)
    return out


def variants_hopper(m, n, k, mode, unroll=False, wide=False):
    """The default, then the L2 prefetch distance (PREFETCH) around it, also with half and double
    the split-K; `unroll`: chunks per iteration at fewer stages; `wide`: the default's chunks per
    iteration on 128-row tiles and 8 warps, at the default's split-K and half of it."""
    base = int_gemm.default_config(m, n, k, mode, tma=False)
    out = [dict(base)]
    if wide:
        for bn, warps in ((64, 8), (128, 4), (128, 8)):
            for split in sorted({base["SPLIT_K"], max(1, base["SPLIT_K"] // 2)}):
                out.append(dict(base, BLOCK_N=bn, num_warps=warps, SPLIT_K=split))
        return out
    for split in sorted({max(1, base["SPLIT_K"] // 2), base["SPLIT_K"], min(16, base["SPLIT_K"] * 2)}):
        for pf in (0, 4, 8):
            cfg = dict(base, SPLIT_K=split, PREFETCH=pf)
            if (k // 128) // split >= 2 and cfg not in out:
                out.append(cfg)
    if unroll:  # chunks per iteration (g128: their scales in one load per row), fewer stages
        for split in sorted({base["SPLIT_K"], max(1, base["SPLIT_K"] // 2)}):
            for chunks, stages in ((2, 3), (2, 4), (4, 2), (4, 3)):
                per = -(-(k // 128) // split)
                if per % chunks == 0 and (k // 128) % per % chunks == 0:
                    out.append(dict(base, SPLIT_K=split, UNROLL=chunks, num_stages=stages))
    return out


def variants_stream(m, n, k, mode):
    """Mid-size M on Hopper: the dispatch's choice (None), the register-A kernel's tiles, then the
    Gluon kernel with W4 unpacked inside it, stream-K (STREAM: the grid shares the tile x chunk
    units) or whole tiles, at 64x128 and 128x128."""
    ws = dict(num_warps=4, num_stages=4, UNPACK=True, WS=True, TMA=True, SPLIT_K=1, FUSE=True)
    out = [None, int_gemm.default_config(m, n, k, mode, tma=False)]
    for bm, bn in ((64, 128), (128, 128)):
        for stream in (True, False):
            out.append(dict(ws, BLOCK_M=bm, BLOCK_N=bn, STREAM=stream))
    return out


def variants_mid(m, n, k, mode):
    """Mid-size M on Hopper: the dispatch's choice (None), the Gluon kernel with W4 unpacked inside
    it (FUSE) or ahead, the tl TMA kernel and the register-A kernel."""
    ws = dict(num_warps=4, num_stages=4, UNPACK=True, WS=True, TMA=True, SPLIT_K=1)
    return [None,
            dict(ws, BLOCK_M=64, BLOCK_N=128, FUSE=True), dict(ws, BLOCK_M=128, BLOCK_N=128, FUSE=True),
            dict(ws, BLOCK_M=128, BLOCK_N=128, FUSE=False), dict(ws, BLOCK_M=128, BLOCK_N=256, num_warps=8, FUSE=False),
            dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, TMA=True, SPLIT_K=1),
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4, TMA=True, SPLIT_K=1),
            int_gemm.default_config(m, n, k, mode, tma=False)]


def variants_reg_a(m, n, k, mode):
    """Mid-size M on Hopper: the dispatch's choice (None), then the Gluon kernel with the packed
    weights as wgmma's register operand (REG_A: the transposed tile, no unpacked copy in shared
    memory) at 64 / 128 / 256 tokens x 128 weight rows (and 128 x 256), whole tiles or stream-K,
    and the shared-memory-unpack Gluon kernel at the same tiles for comparison."""
    ws = dict(num_warps=4, num_stages=4, UNPACK=True, WS=True, TMA=True, SPLIT_K=1, FUSE=True)
    out = [None]
    for bm, bn in ((64, 128), (128, 128), (256, 128), (128, 256)):
        if bm > 2 * m and bm > 64:
            continue
        for stream in (False, True):
            out.append(dict(ws, BLOCK_M=bm, BLOCK_N=bn, STREAM=stream, REG_A=True))
        if bn == 128 and bm <= 128:
            out.append(dict(ws, BLOCK_M=bm, BLOCK_N=bn, STREAM=False))
    return out


def variants_narrow_m(m, n, k, mode):
    """M <= 8: the default (16-token tiles), then 8-token tiles (wgmma's narrowest N: half the X
    tile and the accumulator) at the default's split-K, half and double it, and on 128-row tiles."""
    base = int_gemm.default_config(m, n, k, mode, tma=False)
    out = [dict(base)]
    chunks = k // 128
    for bn, split in ((64, base["SPLIT_K"]), (64, max(1, base["SPLIT_K"] // 2)), (64, min(16, base["SPLIT_K"] * 2)),
                      (128, base["SPLIT_K"]), (128, max(1, base["SPLIT_K"] // 2))):
        unroll = int_gemm.fit_unroll(chunks, split, base.get("UNROLL", 1))
        cfg = dict(base, BLOCK_M=8, BLOCK_N=bn, SPLIT_K=split, UNROLL=unroll)
        if cfg not in out:
            out.append(cfg)
    return out


def variants_mma2(m, n, k, mode):
    """M <= 16: the default (4 warps, one warpgroup: wgmma), then 1 or 2 warps, which Triton runs
    on mma.sync (MMAv2): 20-30% fewer instructions per weight in the offline sm_90 build
    (benchmarks/sass_report.py --warps), at the default's split-K and twice it."""
    base = int_gemm.default_config(m, n, k, mode, tma=False)
    out = [dict(base)]
    chunks = k // 128
    for warps, bn in ((2, 64), (2, 128), (1, 32), (1, 64)):
        for split in sorted({base["SPLIT_K"], min(16, base["SPLIT_K"] * 2)}):
            unroll = int_gemm.fit_unroll(chunks, split, base.get("UNROLL", 1))
            cfg = dict(base, num_warps=warps, BLOCK_N=bn, SPLIT_K=split, UNROLL=unroll)
            if cfg not in out:
                out.append(cfg)
    return out


def variants_short(m, n, k, mode):
    """M <= 16, the short programs (qkv, o_proj): the default, then 4 or 2 warps x chunks per
    iteration x stages x split-K (fewer shared-memory bytes per program: more programs per SM)."""
    base = int_gemm.default_config(m, n, k, mode, tma=False)
    out = [dict(base)]
    chunks = k // 128
    for warps in (4, 2):
        for unroll, stages in ((4, 2), (4, 3), (4, 4), (2, 3), (2, 4), (2, 6)):
            for split in (2, 4, 8):
                per = -(-chunks // split)
                if per % unroll or chunks % per % unroll or per < 2 * unroll:
                    continue
                cfg = dict(base, num_warps=warps, UNROLL=unroll, num_stages=stages, SPLIT_K=split)
                if cfg not in out:
                    out.append(cfg)
    return out


def variants_mid_mma2(m, n, k, mode):
    """Mid-size M: the dispatch's choice (None), then the register-A kernel on 1-2 warps (mma.sync)
    at small tiles, 3 or 4 stages."""
    out = [None]
    for bm, bn, warps in ((64, 64, 2), (32, 64, 2), (64, 32, 2), (128, 64, 2), (64, 64, 1), (32, 32, 1)):
        for stages in (3, 4):
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, SPLIT_K=1, SWAP=True))
    return out


SHAPES_70B = [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]


def short(cfg) -> str:
    if cfg is None:
        return "dispatch"
    keys = ("BLOCK_M", "BLOCK_N", "SPLIT_K", "UNROLL", "num_stages", "PREFETCH", "num_warps", "WS", "FUSE", "STREAM",
            "REG_A", "TMA")
    return ",".join(f"{k[:2].lower()}{cfg[k]}" for k in keys if k in cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16])
    p.add_argument("--kernels", nargs="*", default=["w4a8_per_channel", "w4a8_g128"])
    p.add_argument("--mid-70b", action="store_true", help="Llama-2-70B shapes, the mid-size M dispatch variants")
    p.add_argument("--hopper", action="store_true", help="the L2 prefetch option around the default")
    p.add_argument("--unroll", action="store_true", help="with --hopper: also UNROLL 2 / 4 at fewer stages")
    p.add_argument("--wide", action="store_true", help="with --hopper: only 128-row tiles and 8 warps around the default")
    p.add_argument("--stream", action="store_true", help="mid-size M: stream-K Gluon variants against the dispatch")
    p.add_argument("--reg-a", action="store_true", help="mid-size M: the Gluon kernel's register-operand W4 (REG_A)")
    p.add_argument("--narrow-m", action="store_true", help="M <= 8: 8-token tiles against the default's 16")
    p.add_argument("--mma2", action="store_true", help="M <= 16: 1-2 warps (mma.sync) against the default's warpgroup")
    p.add_argument("--short", action="store_true", help="M <= 16: warps x chunks per iteration x stages x split-K")
    p.add_argument("--mid-mma2", action="store_true", help="mid-size M: the register-A kernel on 1-2 warps (mma.sync)")
    p.add_argument("--shapes", nargs="*", help="only these NxK shapes, e.g. 6144x4096 (default: all)")
    args = p.parse_args()
    if args.mid_70b:
        shapes, make = SHAPES_70B, variants_mid
    else:
        hopper = functools.partial(variants_hopper, unroll=args.unroll, wide=args.wide)
        shapes, make = SHAPES, (hopper if args.hopper else variants_stream if args.stream
                                else variants_reg_a if args.reg_a else variants_narrow_m if args.narrow_m
                                else variants_mma2 if args.mma2
                                else variants_short if args.short else variants_mid_mma2 if args.mid_mma2
                                else variants)
    if args.shapes:
        shapes = [(n, k) for n, k in shapes if f"{n}x{k}" in args.shapes]
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    records = []
    for n, k in shapes:
        wsets = weight_sets(n, k, gen)
        for name in args.kernels:
            fn, ref, _ = KERNELS[name]
            for m in args.ms:
                sets = case_args(name, m, k, wsets[name], gen)
                want = ref(*sets[0])
                case = []
                for cfg in make(m, n, k, MODE_OF[name]):
                    rec = {"kernel": name, "M": m, "N": n, "K": k, "config": cfg}
                    try:
                        err = rel_err(fn(*sets[0], config=cfg), want)
                        if not err < 2e-3:
                            raise AssertionError(f"rel err {err:.3g}")
                        rec["median_ms"] = time_calls([lambda a=a: fn(*a, config=cfg) for a in sets])
                    except Exception as e:  # a config that fails is a result too
                        rec["error"] = str(e)[:200]
                    case.append(rec)
                records += case
                ok = sorted((r for r in case if "median_ms" in r), key=lambda r: r["median_ms"])
                print(f"{name} M={m} N={n} K={k}: default {case[0].get('median_ms', 0) * 1e3:.1f} us; best "
                      + "; ".join(f"{r['median_ms'] * 1e3:.1f} {short(r['config'])}" for r in ok[:3]), flush=True)
                del sets
        del wsets
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"meta": metadata(sys.argv), "ceilings": measure_ceilings(), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
