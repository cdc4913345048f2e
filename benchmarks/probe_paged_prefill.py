"""Probe: the paged prefill attention (chunks reading K/V from the pages) at serving shapes
(Llama-3-8B heads: 32 q, 8 kv, head_dim 128, pages of 64), tile variants, against the flash
kernel on fresh fp16 K/V (`prefill_attention`) and torch SDPA on the same tokens. Each variant is
checked against the default first. Cases: one fresh 1,024-token prompt; eight of them packed;
a 944-token chunk after 1,024 cached tokens; 16 questions of 128 tokens after a cached 2,048-token
prefix.

    python benchmarks/probe_paged_prefill.py --out $OUT/paged-prefill-probe-<gpu>.json
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

from qoq.kernels.kv_cache import allocate_kv_cache, quantize_kv_ref  # noqa: E402
from qoq.kernels.paged_prefill_attention import paged_prefill_attention_triton  # noqa: E402
from qoq.kernels.prefill_attention import prefill_attention_triton  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 64
CASES = {  # name: (query tokens per sequence, cached tokens after the chunk)
    "fresh 1x1024": ([1024], [1024]),
    "fresh 8x1024": ([1024] * 8, [1024] * 8),
    "chunk 944 after 1024": ([944], [1968]),
    "16x128 after 2048": ([128] * 16, [2176] * 16),
}
VARIANTS = {
    "default": None,
    "R64 w4 s2": dict(ROWS=64, num_warps=4, num_stages=2),
    "R64 w4 s3": dict(ROWS=64, num_warps=4, num_stages=3),
    "R128 w4 s2": dict(ROWS=128, num_warps=4, num_stages=2),
    "R128 w8 s3": dict(ROWS=128, num_warps=8, num_stages=3),
    "R128 w8 s1": dict(ROWS=128, num_warps=8, num_stages=1),
    "R256 w8 s2": dict(ROWS=256, num_warps=8, num_stages=2),
}


def make_cache(num_pages, bits, gen):
    cache = allocate_kv_cache(1, num_pages, HKV, D, page_size=PAGE, bits=bits, device="cuda")[0]
    for which in ("k", "v"):
        x = torch.randn(num_pages, HKV, PAGE, D, generator=gen)
        data, scale, zero = quantize_kv_ref(x, bits)
        cache.codes(which).copy_(data.cuda())
        if scale is not None:
            getattr(cache, f"{which}_scale").copy_(scale.cuda())
            getattr(cache, f"{which}_zero").copy_(zero.cuda())
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="paged-prefill-probe.json")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "shape": dict(hq=HQ, hkv=HKV, d=D, page=PAGE), "cases": {}}
    for name, (q_lens, kv_lens) in CASES.items():
        pages_per = -(-max(kv_lens) // PAGE)
        n = len(q_lens)
        bt = torch.randperm(n * pages_per, generator=gen).reshape(n, pages_per).int().cuda()
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
        q = torch.randn(int(cu[-1]), HQ, D, generator=gen).half().cuda()
        row = {}
        flops = sum(4 * HQ * D * ql * (kl - ql / 2) for ql, kl in zip(q_lens, kv_lens))
        if q_lens == kv_lens:  # fresh prompts: the flash kernel and SDPA on fp16 K/V
            k = torch.randn(int(cu[-1]), HKV, D, generator=gen).half().cuda()
            v = torch.randn_like(k)
            row["flash (fresh fp16 K/V)"] = triton.testing.do_bench(
                lambda: prefill_attention_triton(q, k, v, cu, D**-0.5, max(q_lens)))

            def sdpa():
                for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
                    F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                                   v[s:e].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            row["sdpa (fresh fp16 K/V)"] = triton.testing.do_bench(sdpa)
        for bits in (4, 16):
            cache = make_cache(n * pages_per, bits, gen)
            ref = paged_prefill_attention_triton(q, cache, bt, cu, lens, D**-0.5, max(q_lens))
            for vname, opts in VARIANTS.items():
                try:
                    out = paged_prefill_attention_triton(q, cache, bt, cu, lens, D**-0.5, max(q_lens), options=opts)
                    err = (out.float() - ref.float()).abs().max().item()
                    if err > 2e-2:
                        row[f"kv{bits} {vname}"] = f"wrong ({err:.3g})"
                        continue
                    row[f"kv{bits} {vname}"] = triton.testing.do_bench(
                        lambda: paged_prefill_attention_triton(q, cache, bt, cu, lens, D**-0.5, max(q_lens),
                                                               options=opts))
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported
                    row[f"kv{bits} {vname}"] = f"error {type(e).__name__}: {str(e)[:80]}"
        results["cases"][name] = {"ms": row, "tflops": {k: flops / v / 1e9 for k, v in row.items()
                                                        if isinstance(v, float)}}
        print(f"== {name}")
        for k, v in row.items():
            print(f"  {k:28s} {v if isinstance(v, str) else f'{v * 1e3:9.1f} us  {flops / v / 1e9:7.1f} TFLOP/s'}")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
