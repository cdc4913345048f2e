"""Probe: does Triton's warp specialization speed up the int8 TMA GEMM (the prefill GEMM after the
W4 unpack) on the H100?

Variants of one TMA int8 x int8 -> fp16 kernel (per-token x per-channel scales): the shipped
loop, and the same with `tl.range(warp_specialize=True)`. Each is checked against torch._int_mm
first. Session 5 result (N=6144, K=4096, M=8192): 342 us plain, 343 us warp-specialized (no
change on Hopper); a first version also tried 128x128 / 4-warp warp-specialized tiles and a
persistent grid with `flatten=True`, and its compilation did not finish within the device call,
so those variants are left out.

    python benchmarks/probe_ws_gemm.py --out $OUT/ws-gemm-probe-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_int8_mm import _store_scaled, _tile_ids  # noqa: E402  (the plain int8 probe's tile order and epilogue)

from qoq.kernels import w8a8_gemm  # noqa: E402


@triton.jit
def _mm(x_desc, w_desc, sx_ptr, s_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GROUP_M: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES, warp_specialize=WS):
        acc = tl.dot(x_desc.load([pid_m * BM, k * BK]), w_desc.load([pid_n * BN, k * BK]).T, acc,
                     out_dtype=tl.int32)
    _store_scaled(acc, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), sx_ptr, s_ptr, y_ptr, M, N)


def run(x, w, sx, s, cfg):
    M, K = x.shape
    N = w.shape[0]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    y = torch.empty((M, N), dtype=torch.float16, device=x.device)
    xd, wd = TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk])
    common = dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=cfg["stages"], WS=cfg["ws"], num_warps=cfg["warps"])
    _mm[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](xd, wd, sx, s, y, M, N, K, **common)
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--out", default="ws-gemm-probe.json")
    args = parser.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    configs = [dict(variant="plain", ws=ws, BM=128, BN=256, BK=128, warps=8, stages=stages)
               for ws in (False, True) for stages in (4, 3)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for n, k in shapes:
        x = torch.randint(-127, 128, (args.m, k), dtype=torch.int8, device="cuda", generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
        sx = torch.rand(args.m, device="cuda", generator=gen) * 1e-3
        s = (torch.rand(n, device="cuda", generator=gen) * 1e-3).half()
        want = (torch._int_mm(x, w.t()).float() * sx[:, None] * s.float()[None, :]).half()
        ops = 2 * args.m * n * k
        shipped = triton.testing.do_bench(lambda: w8a8_gemm(x, sx, w, s), return_mode="median")
        records.append(dict(variant="shipped_w8a8", N=n, K=k, M=args.m, ms=shipped, tops=ops / shipped / 1e9))
        print(f"N={n} K={k}: shipped w8a8 {shipped * 1e3:.0f} us {ops / shipped / 1e9:.0f} TOP/s", flush=True)
        for cfg in configs:
            name = f"{cfg['variant']} ws={int(cfg['ws'])} {cfg['BM']}x{cfg['BN']} w{cfg['warps']} s{cfg['stages']}"
            try:
                got = run(x, w, sx, s, cfg)
                torch.cuda.synchronize()
                if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
                    raise AssertionError("wrong result")
                ms = triton.testing.do_bench(lambda: run(x, w, sx, s, cfg), return_mode="median")
                records.append(dict(cfg, N=n, K=k, M=args.m, ms=ms, tops=ops / ms / 1e9))
                print(f"  {name:40} {ms * 1e3:8.0f} us {ops / ms / 1e9:6.0f} TOP/s  {shipped / ms:5.2f}x", flush=True)
            except Exception as err:  # noqa: BLE001 - a variant that does not compile is a result too
                records.append(dict(cfg, N=n, K=k, M=args.m, error=repr(err)[:300]))
                print(f"  {name:40} failed: {traceback.format_exception_only(err)[-1].strip()[:150]}", flush=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
