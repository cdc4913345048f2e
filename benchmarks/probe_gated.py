"""The MLP's gate/up step, two ways, on the GPU: the GEMM writing [M, 2I] then SiLU*mul+quant
(before), and the GEMM with silu_mul=True writing [M, I] then the per-token quant (fused in the
epilogue where `int_gemm.fused_silu_mul` says so: the unpack-first path, whose unpack interleaves
gate and up rows; elsewhere the GEMM then a SiLU*mul pass, which the model does not use).

    python benchmarks/probe_gated.py --out $OUT/gated-probe-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qoq.kernels import int_gemm, quantize_per_token, silu_mul_quant, w4a8_g128_gemm, w4a8_per_channel_gemm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ms", default="993,1200,2048,7680")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--out", default="gated-probe.json")
    args = parser.parse_args()
    k, n = args.hidden, 2 * args.intermediate
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    s1 = (torch.rand(n, device="cuda", generator=gen) * 1e-3 + 1e-4).half()
    szero = (torch.rand(n, device="cuda", generator=gen) * 1e-3).half()
    s2 = torch.randint(1, 16, (n, k // 128), dtype=torch.int8, device="cuda", generator=gen)
    sz = (s2.int() * 8).clamp(max=127).to(torch.int8)  # q4 * s2 - sz stays in int8
    records = []
    print(f"{'variant':12} {'M':>5} {'before us':>10} {'gated us':>9} {'speedup':>8}")
    for m in map(int, args.ms.split(",")):
        x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda", generator=gen)
        sx = torch.rand(m, device="cuda", generator=gen) * 1e-2
        xsum = torch.randn(m, device="cuda", generator=gen)
        variants = {
            "per_channel": lambda silu: w4a8_per_channel_gemm(x8, sx, xsum, packed, s1, szero, silu_mul=silu),
            "g128": lambda silu: w4a8_g128_gemm(x8, sx, packed, s1, s2, sz, silu_mul=silu),
        }
        for name, gemm in variants.items():
            torch.testing.assert_close(  # the epilogue computes what the two kernels do
                gemm(True).float(), torch.nn.functional.silu(gemm(False)[:, : n // 2].float()) * gemm(False)[:, n // 2:].float(),
                rtol=2e-2, atol=1e-2)
            before = triton.testing.do_bench(lambda: silu_mul_quant(gemm(False)), return_mode="median")
            after = triton.testing.do_bench(lambda: quantize_per_token(gemm(True)), return_mode="median")
            fused = int_gemm.fused_silu_mul(m, n, k, int_gemm.MODE_W4_G128 if name == "g128" else int_gemm.MODE_W4_PER_CHANNEL,
                                            x8.device)
            records.append({"variant": name, "M": m, "N": n, "K": k, "fused": fused, "before_us": 1e3 * before,
                            "gated_us": 1e3 * after})
            print(f"{name:12} {m:>5} {1e3 * before:>10.1f} {1e3 * after:>9.1f} {before / after:>8.2f}x"
                  f"{'' if fused else '  (not fused here)'}", flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
