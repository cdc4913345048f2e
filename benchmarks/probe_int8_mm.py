"""Probe: how fast can a Triton int8 x int8 GEMM run on the H100 at prefill sizes?

Variants of a plain tensor-core GEMM with both operands in shared memory (no register-A unpack):
pointer loads or TMA descriptors, several tiles, and the W4 -> int8 unpack it would need in front
of it, against the shipped kernels (w8a8, w4a8 per-channel / g128), torch._int_mm and cuBLAS bf16.
Every variant is checked against torch._int_mm first. Prints a table, writes JSON to --out.

    python benchmarks/probe_int8_mm.py --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.kernels import int_gemm, pack_w4, w4a8_g128_gemm, w4a8_per_channel_gemm, w8a8_gemm  # noqa: E402

_unpack_w4 = int_gemm._unpack_w4.jitted  # the shipped word-wide unpack (inline PTX: GPU only)


@triton.jit
def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _store_scaled(acc, offs_m, offs_n, sx_ptr, s_ptr, y_ptr, M, N):
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * s[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(tl.float16), mask=mask)


@triton.jit
def _mm_ptr(x_ptr, w_ptr, sx_ptr, s_ptr, y_ptr, M, N, K,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
            STAGES: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    xp = x_ptr + (offs_m % M)[:, None].to(tl.int64) * K + offs_k[None, :]
    wp = w_ptr + (offs_n % N)[None, :].to(tl.int64) * K + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(tl.load(xp + k), tl.load(wp + k), acc, out_dtype=tl.int32)
    _store_scaled(acc, offs_m, offs_n, sx_ptr, s_ptr, y_ptr, M, N)


@triton.jit
def _mm_tma(x_desc, w_desc, sx_ptr, s_ptr, y_ptr, M, N, K,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
            STAGES: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in tl.range(0, K, BK, num_stages=STAGES, warp_specialize=WS):
        x = x_desc.load([pid_m * BM, k])
        w = w_desc.load([pid_n * BN, k])
        acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    _store_scaled(acc, offs_m, offs_n, sx_ptr, s_ptr, y_ptr, M, N)


@triton.jit
def _mm_tma_persistent(x_desc, w_desc, sx_ptr, s_ptr, y_ptr, M, N, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       STAGES: tl.constexpr, NUM_SMS: tl.constexpr):
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_ids(tile, M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for kk in tl.range(0, k_tiles, num_stages=STAGES):
            x = x_desc.load([pid_m * BM, kk * BK])
            w = w_desc.load([pid_n * BN, kk * BK])
            acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        _store_scaled(acc, offs_m, offs_n, sx_ptr, s_ptr, y_ptr, M, N)


@triton.jit
def _unpack_kernel(p_ptr, s2_ptr, sz_ptr, out_ptr, N, K, G128: tl.constexpr, BN: tl.constexpr):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_j = tl.arange(0, 64)
    mask = (offs_n < N)[:, None]
    p = tl.load(p_ptr + offs_n[:, None].to(tl.int64) * (K // 2) + c * 64 + offs_j[None, :], mask=mask, other=0)
    lo = (p & 0xF).to(tl.int32)
    hi = (p >> 4).to(tl.int32)
    if G128:
        s2 = tl.load(s2_ptr + offs_n * (K // 128) + c, mask=offs_n < N, other=0).to(tl.int32)
        sz = tl.load(sz_ptr + offs_n * (K // 128) + c, mask=offs_n < N, other=0).to(tl.int32)
        lo = lo * s2[:, None] - sz[:, None]
        hi = hi * s2[:, None] - sz[:, None]
    base = out_ptr + offs_n[:, None].to(tl.int64) * K + c * 128 + offs_j[None, :]
    tl.store(base, lo.to(tl.int8), mask=mask)
    tl.store(base + 64, hi.to(tl.int8), mask=mask)


@triton.jit
def _w4_tma_fused(x_desc, w_desc, sx_ptr, s_ptr, xsum_ptr, sz_ptr, s2_ptr, y_ptr, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr,
                  G128: tl.constexpr, PERSIST: tl.constexpr, NUM_SMS: tl.constexpr):
    """W4A8 with the packed weight TMA-loaded, unpacked in registers and fed as the smem B operand."""
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    start = tl.program_id(0)
    step = NUM_SMS if PERSIST else num_tiles
    for tile in tl.range(start, num_tiles, step, flatten=PERSIST):
        pid_m, pid_n = _tile_ids(tile, M, N, BM, BN, GROUP_M)
        offs_n = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for c in tl.range(0, K // 128, num_stages=STAGES):
            x_lo = x_desc.load([pid_m * BM, c * 128])
            x_hi = x_desc.load([pid_m * BM, c * 128 + 64])
            p = w_desc.load([pid_n * BN, c * 64])
            if G128:
                s2 = tl.load(s2_ptr + offs_n * (K // 128) + c).to(tl.int32)
                sz = tl.load(sz_ptr + offs_n * (K // 128) + c).to(tl.int32)
                w_lo, w_hi = _unpack_w4(p, s2, sz, 1, True, BN)
            else:
                w_lo, w_hi = _unpack_w4(p, offs_n, offs_n, 2, True, BN)
            acc = tl.dot(x_lo, w_lo.T, acc, out_dtype=tl.int32)
            acc = tl.dot(x_hi, w_hi.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BM + tl.arange(0, BM)
        sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * sx[:, None] * s[None, :]
        if not G128:
            xsum = tl.load(xsum_ptr + offs_m, mask=offs_m < M, other=0.0)
            szero = tl.load(sz_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            y = y - xsum[:, None] * szero[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(tl.float16), mask=mask)


def make_fused(x8, packed, sx, s, xsum, szero, s2, sz, cfg, g128, persistent):
    M, K = x8.shape
    N = packed.shape[0]
    bm, bn, warps, stages = cfg
    y = torch.empty(M, N, dtype=torch.float16, device=x8.device)
    xd = TensorDescriptor.from_tensor(x8, [bm, 64])
    wd = TensorDescriptor.from_tensor(packed, [bn, 64])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    sms = torch.cuda.get_device_properties(x8.device).multi_processor_count
    grid = (min(sms, tiles),) if persistent else (tiles,)

    def call():
        _w4_tma_fused[grid](xd, wd, sx, s, xsum, sz if g128 else szero, s2, y, M, N, K, BM=bm, BN=bn, GROUP_M=8,
                            STAGES=stages, G128=g128, PERSIST=persistent, NUM_SMS=grid[0], num_warps=warps)
        return y
    return call


def run_ptr(x8, w8, sx, s, cfg):
    M, K = x8.shape
    N = w8.shape[0]
    y = torch.empty(M, N, dtype=torch.float16, device=x8.device)
    bm, bn, bk, warps, stages = cfg
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _mm_ptr[grid](x8, w8, sx, s, y, M, N, K, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=stages, num_warps=warps)
    return y


def make_tma(x8, w8, sx, s, cfg, ws=False, persistent=False):
    M, K = x8.shape
    N = w8.shape[0]
    bm, bn, bk, warps, stages = cfg
    y = torch.empty(M, N, dtype=torch.float16, device=x8.device)
    xd = TensorDescriptor.from_tensor(x8, [bm, bk])
    wd = TensorDescriptor.from_tensor(w8, [bn, bk])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if persistent:
        sms = torch.cuda.get_device_properties(x8.device).multi_processor_count
        grid = (min(sms, tiles),)

        def call():
            _mm_tma_persistent[grid](xd, wd, sx, s, y, M, N, K, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=stages,
                                     NUM_SMS=grid[0], num_warps=warps)
            return y
    else:
        def call():
            _mm_tma[(tiles,)](xd, wd, sx, s, y, M, N, K, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=stages, WS=ws,
                              num_warps=warps)
            return y
    return call


FUSED_CFGS = [(128, 256, 8, 4), (128, 128, 4, 4), (128, 128, 4, 3), (128, 128, 4, 5), (256, 128, 8, 3),
              (128, 64, 4, 4)]


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="8192,1024,512")
    ap.add_argument("--fused-only", action="store_true")
    ap.add_argument("--fused-cfgs", default=None, help="BMxBNxWARPSxSTAGES,... (default FUSED_CFGS)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if args.fused_cfgs:
        FUSED_CFGS[:] = [tuple(int(v) for v in c.split("x")) for c in args.fused_cfgs.split(",")]
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    cfgs = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
            (128, 128, 128, 4, 4), (128, 256, 64, 8, 4), (128, 128, 64, 4, 5)]
    records = []
    for M in [int(m) for m in args.ms.split(",")]:
        for N, K in shapes:
            x8 = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
            w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
            sx = torch.rand(M, device=dev) * 1e-3
            s = (torch.rand(N, device=dev) * 1e-3).half()
            xsum = torch.rand(M, device=dev)
            ref = (torch._int_mm(x8, w8.T).float() * sx[:, None] * s.float()[None, :]).half()
            ops = 2 * M * N * K

            def rec(name, fn, check=True):
                try:
                    if check:
                        out = fn()
                        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                        if err > 1e-2:
                            print(f"  {name}: WRONG rel err {err:.3g}")
                            return
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001 - a probe: report and go on
                    print(f"  {name}: failed {type(e).__name__}: {str(e)[:160]}")
                    return
                r = dict(kernel=name, M=M, N=N, K=K, median_ms=ms, tops=ops / ms / 1e9)
                records.append(r)
                print(f"M={M:5d} N={N:5d} K={K:5d} {name:34s} {ms * 1e3:9.1f} us {r['tops']:7.0f} TOPS", flush=True)

            rec("int8_cublas", lambda: torch._int_mm(x8, w8.T), check=False)
            a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            b = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
            rec("bf16_cublas", lambda: a @ b.T, check=False)
            rec("qoq_w8a8", lambda: w8a8_gemm(x8, sx, w8, s))
            q4 = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
            packed = pack_w4(q4)
            szero = (torch.rand(N, device=dev) * 1e-3).half()
            ref_pc = w4a8_per_channel_gemm(x8, sx, xsum, packed, s, szero)
            rec("qoq_w4a8_per_channel", lambda: w4a8_per_channel_gemm(x8, sx, xsum, packed, s, szero), check=False)
            s2 = torch.randint(1, 9, (N, K // 128), dtype=torch.uint8, device=dev)
            sz = (torch.randint(0, 8, (N, K // 128), device=dev) * s2.int()).clamp(max=119).to(torch.int8)
            ref_g = w4a8_g128_gemm(x8, sx, packed, s, s2, sz)
            rec("qoq_w4a8_g128", lambda: w4a8_g128_gemm(x8, sx, packed, s, s2, sz), check=False)
            for fcfg in FUSED_CFGS:
                for g128, want in ((False, ref_pc), (True, ref_g)):
                    for pers in ((False, True) if fcfg[2] == 8 else (False,)):
                        name = f"fused_{'g128' if g128 else 'pc'}{'_pers' if pers else ''}_{'x'.join(map(str, fcfg))}"
                        try:
                            fn = make_fused(x8, packed, sx, s, xsum, szero, s2, sz, fcfg, g128, pers)
                            out = fn()
                            err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
                        except Exception as e:  # noqa: BLE001
                            print(f"  {name}: failed {type(e).__name__}: {str(e)[:200]}")
                            continue
                        if err > 1e-2:
                            print(f"  {name}: WRONG rel err {err:.3g}")
                            continue
                        rec(name, fn, check=False)
            if args.fused_only:
                del x8, w8, a, b, packed
                torch.cuda.empty_cache()
                continue
            w_out = torch.empty(N, K, dtype=torch.int8, device=dev)
            for g in (0, 1):
                def unpack(g=g):
                    _unpack_kernel[(triton.cdiv(N, 64), K // 128)](packed, s2, sz, w_out, N, K, G128=g, BN=64)
                    return w_out
                unpack()
                if g == 0:
                    assert torch.equal(w_out, q4.to(torch.int8)), "unpack per-channel wrong"
                rec(f"unpack_w4{'_g128' if g else ''}", unpack, check=False)
            for cfg in cfgs:
                tag = "x".join(map(str, cfg))
                rec(f"ptr_{tag}", lambda cfg=cfg: run_ptr(x8, w8, sx, s, cfg))
                rec(f"tma_{tag}", make_tma(x8, w8, sx, s, cfg))
                if cfg[3] == 8:
                    rec(f"tma_ws_{tag}", make_tma(x8, w8, sx, s, cfg, ws=True))
                rec(f"tma_pers_{tag}", make_tma(x8, w8, sx, s, cfg, persistent=True))
            del x8, w8, a, b, packed, w_out
            torch.cuda.empty_cache()
    # summary: best variant per (M, shape) against cuBLAS int8 and the shipped kernels
    print("\nbest per shape:")
    by = {}
    for r in records:
        by.setdefault((r["M"], r["N"], r["K"]), []).append(r)
    for key, rs in by.items():
        mine = [r for r in rs if r["kernel"].startswith(("ptr_", "tma_"))]
        best = max(mine, key=lambda r: r["tops"]) if mine else None
        ref = {r["kernel"]: r["tops"] for r in rs}
        if best:
            print(key, f"best {best['kernel']} {best['tops']:.0f} | int8_cublas {ref.get('int8_cublas', 0):.0f}"
                  f" w8a8 {ref.get('qoq_w8a8', 0):.0f} pc {ref.get('qoq_w4a8_per_channel', 0):.0f}"
                  f" g128 {ref.get('qoq_w4a8_g128', 0):.0f} bf16 {ref.get('bf16_cublas', 0):.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                  triton=triton.__version__, records=records), indent=1))


if __name__ == "__main__":
    main()
