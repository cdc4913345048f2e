"""Probe: the varlen causal prefill attention at a serving step's shape (Llama-3-8B heads: 32 q, 8
kv, head_dim 128; 7-8 prompts of 1024 tokens packed) on the H100, tile variants against torch SDPA
(flash) per sequence on the same data. Each variant is checked against SDPA first.

    python benchmarks/probe_prefill_attention.py --out $OUT/prefill-attention-probe-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.kernels.prefill_attention import prefill_attention_triton  # noqa: E402

VARIANTS = {
    "default": None,
    "128x128 w8 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "128x64 w8 s2": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    "128x64 w8 s4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    "128x64 w4 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "64x64 w4 s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "128x128 w8 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, default=7)
    parser.add_argument("--len", type=int, default=1024)
    parser.add_argument("--default-only", action="store_true", help="time only the kernel's default tiles")
    parser.add_argument("--out", default="prefill-attention-probe.json")
    args = parser.parse_args()
    hq, hkv, d = 32, 8, 128
    t = args.seqs * args.len
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.float16, generator=gen)
    q = qkv[:, : hq * d].view(t, hq, d)  # strided views of one fused projection, as the model has them
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    cu = torch.arange(0, t + 1, args.len, dtype=torch.int32, device="cuda")
    scale = d ** -0.5

    def sdpa():
        qs = q.view(args.seqs, args.len, hq, d).transpose(1, 2)
        ks = k.view(args.seqs, args.len, hkv, d).transpose(1, 2)
        vs = v.view(args.seqs, args.len, hkv, d).transpose(1, 2)
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)

    want = sdpa().transpose(1, 2).reshape(t, hq, d)
    flops = 4 * args.seqs * hq * d * args.len * (args.len + 1) / 2
    base = triton.testing.do_bench(sdpa, return_mode="median")
    records = [dict(variant="sdpa_fp16", ms=base, tflops=flops / base / 1e9)]
    print(f"{'sdpa (flash)':16} {base * 1e3:8.1f} us {flops / base / 1e9:6.0f} TFLOP/s")
    variants = VARIANTS if not args.default_only else {"default": None}
    for name, opts in variants.items():
        rec = dict(variant=name, options=opts)
        kw = {"options": opts} if opts else {}
        try:
            got = prefill_attention_triton(q, k, v, cu, scale, args.len, **kw)
            err = float((got.float() - want.float()).abs().max())
            if not err < 2e-2:
                raise AssertionError(f"max abs err {err:.3g}")
            ms = triton.testing.do_bench(lambda: prefill_attention_triton(q, k, v, cu, scale, args.len, **kw),
                                         return_mode="median")
            rec.update(ms=ms, tflops=flops / ms / 1e9, vs_sdpa=base / ms)
            print(f"{name:16} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.0f} TFLOP/s  {base / ms:5.2f}x sdpa", flush=True)
        except Exception as err:  # noqa: BLE001 - a failing variant is a result too
            rec["error"] = repr(err)[:200]
            print(f"{name:16} failed: {rec['error'][:100]}", flush=True)
        records.append(rec)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "seqs": args.seqs, "len": args.len,
                                          "records": records}, indent=1))


if __name__ == "__main__":
    main()
