import pytest
import torch
from conftest import requires_cuda
from helpers import as_fused_qkv_views, cos_sin_cache, rel_err

from qoq.kernels.kv_cache import (
    allocate_kv_cache,
    dequantize_kv_ref,
    quantize_kv_ref,
    rope_kv_write_ref,
    rope_kv_write_triton,
)


def hf_rope_float64(x, pos, head_dim, base=10000.0):
    """HuggingFace rotate_half RoPE, written independently in float64."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=x.device) / head_dim)
    emb = torch.cat([pos.double()[:, None] * inv] * 2, dim=-1)[:, None]
    x = x.double()
    rot = torch.cat([-x[..., head_dim // 2:], x[..., : head_dim // 2]], dim=-1)
    return x * emb.cos() + rot * emb.sin()


def sylvester_float64(n):
    """Normalized Hadamard by Kronecker doubling (independent of the kernels' popcount rule)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_kv_ref_error_bound(bits, gen):
    x = torch.randn(5, 3, 64, generator=gen)
    data, scale, zero = quantize_kv_ref(x, bits)
    assert data.shape[-1] == (32 if bits == 4 else 64) and data.dtype == torch.uint8
    err = (dequantize_kv_ref(data, scale, zero, bits, torch.float32) - x).abs()
    assert (err <= scale.float()[..., None] * 0.5 + 2e-3 * x.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("fused,hadamard", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_rope_kv_write_matches_ref(bits, fused, hadamard, device, gen, poison):
    """fused: the Triton kernel reads q, k, v as strided views of one qkv tensor (no copies).
    hadamard: a qk_hadamard cache, q and k rotated by H after RoPE."""
    t, hq, hkv, d, page = 7, 6, 2, 32, 8
    q = torch.randn(t, hq, d, generator=gen).half().to(device)
    k = torch.randn(t, hkv, d, generator=gen).half().to(device)
    v = torch.randn(t, hkv, d, generator=gen).half().to(device)
    pos = torch.randint(0, 200, (t,), generator=gen).to(device)
    cs = cos_sin_cache(256, d).to(device)
    slots = torch.tensor([3, 9, 17, -1, 30, 31, 0], device=device)
    names = ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero")
    caches, init = [], {}
    for fn in (rope_kv_write_ref, rope_kv_write_triton):
        cache = allocate_kv_cache(1, 4, hkv, d, page_size=page, bits=bits, device=device, qk_hadamard=hadamard)[0]
        for name in names:
            tensor = getattr(cache, name)
            if tensor is not None:  # same random contents: slots we skip must stay untouched
                if name not in init:
                    init[name] = torch.randint(0, 200, tensor.shape, generator=gen).to(tensor.dtype)
                tensor.copy_(init[name])
        if fn is rope_kv_write_triton:  # several tokens per program, a partial last one (7 tokens)
            args = as_fused_qkv_views(q, k, v) if fused else (q, k, v)
            # fused: other tiles than the defaults (several tokens and the query heads spread over
            # programs, a partial last one; with the Hadamard the fp32-exact split)
            opts = ({"TOK": 4, "HEADS": 4, "SPLIT": True} if hadamard else {"TOK": 2, "HEADS": 4}) if fused else None
            out = fn(*args, pos, cs, slots, cache, options=opts)
        else:
            out = fn(q, k, v, pos, cs, slots, cache)
        caches.append((cache, out))
    (c_ref, (q_ref, k_ref)), (c_tri, (q_tri, k_tri)) = caches
    assert rel_err(q_tri, q_ref) < 1e-3 and rel_err(k_tri, k_ref) < 1e-3
    h = sylvester_float64(d).to(device) if hadamard else torch.eye(d, dtype=torch.float64, device=device)
    assert rel_err(q_ref, hf_rope_float64(q, pos, d) @ h) < 1e-3
    assert rel_err(k_ref, hf_rope_float64(k, pos, d) @ h) < 1e-3
    # the rotation leaves every attention score as it was
    scores = torch.einsum("tqd,tkd->tqk", q_ref.double(), k_ref.double())
    plain = torch.einsum("tqd,tkd->tqk", hf_rope_float64(q, pos, d), hf_rope_float64(k, pos, d))
    assert rel_err(scores, plain) < 2e-3
    for name in ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero"):
        a, b = getattr(c_ref, name), getattr(c_tri, name)
        if a is None:
            continue
        if name.endswith("cache") and bits != 16:  # codes: rare +-1 at rounding ties
            lo_hi = (lambda x: torch.cat([x & 0xF, x >> 4], -1)) if bits == 4 else (lambda x: x)
            assert int((lo_hi(a).int() - lo_hi(b).int()).abs().max()) <= 1, name
        else:
            assert rel_err(b.float(), a.float()) < 1e-3, name
    # the written tokens dequantize to k_rot / v
    page_idx, off = torch.tensor([0, 1], device=device), torch.tensor([3, 1], device=device)  # slots 3, 9
    kd = dequantize_kv_ref(c_ref.k_cache[page_idx, :, off], *(
        (c_ref.k_scale[page_idx, :, off], c_ref.k_zero[page_idx, :, off]) if bits != 16 else (None, None)),
        bits=bits, dtype=torch.float32)
    assert rel_err(kd, k_ref[:2].float()) < (0.1 if bits == 4 else 0.01)


@requires_cuda
@pytest.mark.parametrize("hadamard", [False, True])
def test_rope_kv_write_real_shapes_gpu(hadamard, gen, poison):
    t, hq, hkv, d = 512, 32, 8, 128
    q, k, v = (torch.randn(t, h, d, generator=gen).half().cuda() for h in (hq, hkv, hkv))
    pos = torch.arange(t).cuda()
    cs = cos_sin_cache(4096, d).cuda()
    slots = torch.randperm(64 * 16, generator=gen)[:t].cuda()
    c1 = allocate_kv_cache(1, 16, hkv, d, bits=4, device="cuda", qk_hadamard=hadamard)[0]
    c2 = allocate_kv_cache(1, 16, hkv, d, bits=4, device="cuda", qk_hadamard=hadamard)[0]
    a = rope_kv_write_ref(q, k, v, pos, cs, slots, c1)
    b = rope_kv_write_triton(q, k, v, pos, cs, slots, c2)
    assert rel_err(b[0], a[0]) < 1e-3 and rel_err(b[1], a[1]) < 1e-3
    assert rel_err(c2.k_scale.float(), c1.k_scale.float()) < 1e-3
