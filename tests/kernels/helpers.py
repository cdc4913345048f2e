"""Data generators and error metrics shared by the kernel tests (fresh random data, never zeros)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from qoq.kernels.w4a8_gemm import pack_w4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or overflow)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _dev(gen):
    return gen.device if gen is not None else "cpu"


def random_activations(m: int, k: int, device="cpu", gen=None):
    """int8 x, fp32 per-token scale, fp32 per-token sum of the dequantized row."""
    x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen, device=_dev(gen)).to(device)
    sx = (torch.rand(m, generator=gen, device=_dev(gen)) * 0.02 + 1e-3).to(device)
    xsum = x8.float().sum(1) * sx
    return x8, sx, xsum


def random_weight(n: int, k: int, gen=None) -> torch.Tensor:
    return torch.randn(n, k, generator=gen, dtype=torch.float64, device=_dev(gen)) * 0.02


def quantize_g128(w: torch.Tensor, group_size: int = 128):
    """Progressive quantization (docs/quantization.md#progressive-group-quantization) in float64: returns q4, s1, s2, sz (unpacked)."""
    n, k = w.shape
    s1 = (w.abs().amax(1) / 119).to(torch.float16)
    q8 = torch.round(w / s1.double()[:, None]).clamp(-119, 119)
    g = q8.reshape(n, k // group_size, group_size)
    mn, mx = g.amin(-1), g.amax(-1)
    s2 = torch.ceil((mx - mn) / 15).clamp(1, 16)
    z = torch.round(-mn / s2).clamp(0, 15)
    q4 = (torch.round(g / s2[..., None]) + z[..., None]).clamp(0, 15)
    return (q4.reshape(n, k).to(torch.uint8), s1, s2.to(torch.uint8), (z * s2).to(torch.int8))


def quantize_per_channel(w: torch.Tensor):
    """Asymmetric uint4 per output channel: returns q4, s (fp16), szero = z * s (fp16)."""
    mn, mx = w.amin(1), w.amax(1)
    s = ((mx - mn) / 15).to(torch.float16)
    z = torch.round(-mn / s.double()).clamp(0, 15)
    q4 = (torch.round(w / s.double()[:, None]) + z[:, None]).clamp(0, 15).to(torch.uint8)
    return q4, s, (z * s.double()).to(torch.float16)


def g128_weights(n, k, device="cpu", gen=None):
    q4, s1, s2, sz = quantize_g128(random_weight(n, k, gen))
    return tuple(t.to(device) for t in (pack_w4(q4), s1, s2, sz))


def per_channel_weights(n, k, device="cpu", gen=None):
    q4, s, szero = quantize_per_channel(random_weight(n, k, gen))
    return tuple(t.to(device) for t in (pack_w4(q4), s, szero))


def w8_weights(n, k, device="cpu", gen=None):
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen, device=_dev(gen))
    s = torch.rand(n, generator=gen, device=_dev(gen)) * 0.01 + 1e-4
    return w.to(device), s.half().to(device)


def g128_case(m, n, k, device="cpu", gen=None):
    x8, sx, _ = random_activations(m, k, device, gen)
    return (x8, sx) + g128_weights(n, k, device, gen)


def per_channel_case(m, n, k, device="cpu", gen=None):
    return random_activations(m, k, device, gen) + per_channel_weights(n, k, device, gen)


def cos_sin_cache(max_pos, head_dim, base=10000.0):
    """A RoPE table as the model's rotary holds it: [max_pos, head_dim] = cos | sin of each half's angles."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    f = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv
    return torch.cat([f.cos(), f.sin()], dim=1).float()


def as_fused_qkv_views(q, k, v):
    """q, k, v as row views of one [T, (Hq + 2 Hkv) * D] tensor, the way the model splits its fused
    qkv projection (token stride larger than heads * D)."""
    t, d = q.shape[0], q.shape[2]
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    a, b = q.shape[1] * d, k.shape[1] * d
    views = (qkv[:, :a], qkv[:, a:a + b], qkv[:, a + b:])
    return tuple(x.view(t, -1, d) for x in views)


def sass_report(*args) -> dict:
    """benchmarks/sass_report.py in its own process (the interpreter's patches on triton.language
    break real compiles in this one): the kernel's sm_90 build, no GPU needed."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "sass_report.py"), *args],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert out.returncode == 0, out.stderr[-2000:]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.stdout.splitlines())}
