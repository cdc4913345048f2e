"""Probe: tiles of the W4A8 GEMMs at serving-decode sizes (M ~ 1000-1200: a decode step of a
batch near the largest that fits) on the H100, for the four Llama-3-8B shapes.

Times the shipped default against TMA-kernel tile variants and the unpack-first path (each
checked against the reference first), with the protocol of bench_kernels.py (CUDA graph of the
calls over rotated weight copies, median of replays). Prints per-shape times and the sum over a
decoder layer; JSON to --out.

    python benchmarks/probe_decode_gemm.py --ms 1024,1200 --out $OUT/decode-gemm-probe-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import KERNELS, SHAPES, case_args, time_calls, weight_sets  # noqa: E402
from helpers import rel_err  # noqa: E402

from qoq.kernels import int_gemm  # noqa: E402

VARIANTS = {
    "128x128 w4 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
    "128x128 w4 s4": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4),
    "128x128 w4 s5": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=5),
    "128x128 w8 s4": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
    "64x256 w4 s4": dict(BLOCK_M=64, BLOCK_N=256, num_warps=4, num_stages=4),
    "128x256 w8 s3": dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
    "256x128 w8 s3": dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3),
    "128x64 w4 s4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
    "128x128 w4 s4 g16": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, GROUP_M=16),
    "unpack 128x256 w8 s4": dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, UNPACK=True),
    "unpack 128x128 w4 s4": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=True),
    # the warp-specialized persistent Gluon kernel (ws_gemm.py): after the unpack pass, or with W4
    # unpacked inside it (FUSE)
    "unpack ws 128x256 s4": dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, UNPACK=True, WS=True, FUSE=False),
    "unpack ws 128x256 s4 g16": dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, UNPACK=True, WS=True,
                                     FUSE=False, GROUP_M=16),
    "unpack ws 128x128 s7": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=False),
    "unpack ws 64x256 s5": dict(BLOCK_M=64, BLOCK_N=256, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=False),
    "unpack ws 256x128 s4": dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3, UNPACK=True, WS=True, FUSE=False),
    "fused ws 128x256": dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4, UNPACK=True, WS=True, FUSE=True),
    "fused ws 128x128": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True),
    "fused ws 64x64": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True),
    "fused ws 128x64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True),
    "fused ws 64x128": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True),
    "fused ws 64x256": dict(BLOCK_M=64, BLOCK_N=256, num_warps=4, num_stages=4, UNPACK=True, WS=True, FUSE=True),
    "fused ws 256x128": dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3, UNPACK=True, WS=True, FUSE=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ms", default="1024,1200")
    parser.add_argument("--kernels", default="w4a8_per_channel,w4a8_g128")
    parser.add_argument("--out", default="decode-gemm-probe.json")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: default, nosplit (the default tiles without the "
                             "TMA kernel's split tail), " + ", ".join(VARIANTS))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    totals: dict = {}
    for n, k in SHAPES:
        wsets = weight_sets(n, k, gen)
        for m in map(int, args.ms.split(",")):
            for name in args.kernels.split(","):
                fn, ref, _ = KERNELS[name]
                sets = case_args(name, m, k, wsets[name], gen)
                want = ref(*sets[0])
                default = int_gemm.default_config(m, n, k, {"w4a8_g128": 1, "w4a8_per_channel": 2}[name], tma=True)
                variants = {"default": default, "nosplit": dict(default, SLOTS=1 << 30),
                            **{v: dict(c, TMA=True, SPLIT_K=1) for v, c in VARIANTS.items()}}
                if args.variants:
                    variants = {v: variants[v] for v in args.variants.split(",")}
                else:
                    variants.pop("nosplit")
                for label, cfg in variants.items():
                    rec = dict(kernel=name, M=m, N=n, K=k, variant=label, config=cfg)
                    try:
                        err = rel_err(fn(*sets[0], config=cfg), want)
                        if not err < 2e-3:
                            raise AssertionError(f"rel err {err:.3g}")
                        rec["us"] = 1e3 * time_calls([lambda a=a: fn(*a, config=cfg) for a in sets], reps=10)
                        totals.setdefault((name, m, label), []).append(rec["us"])
                    except Exception as err:  # noqa: BLE001 - a failing variant is a result too
                        rec["error"] = repr(err)[:200]
                    records.append(rec)
                    print(f"{name:17} M={m:5} N={n:5} K={k:5} {label:22} "
                          + (f"{rec['us']:8.1f} us" if "us" in rec else rec["error"][:80]), flush=True)
                del sets
        del wsets
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "records": records}, indent=1))
    print("resident CTAs learned per TMA kernel variant:", sorted(set(int_gemm._TMA_SLOTS.values())))
    print("\nper decoder layer (sum over the four shapes), us:")
    for (name, m, label), us in sorted(totals.items(), key=lambda kv: (kv[0][0], kv[0][1], sum(kv[1]))):
        if len(us) == len(SHAPES):
            print(f"{name:17} M={m:5} {label:22} {sum(us):8.1f}")


if __name__ == "__main__":
    main()
