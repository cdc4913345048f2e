import pytest
import torch
from conftest import requires_cuda
from helpers import rel_err

from qoq.kernels.quant import (
    quantize_per_token_ref,
    quantize_per_token_triton,
    rmsnorm_quant_ref,
    rmsnorm_quant_triton,
    silu_mul_quant_ref,
    silu_mul_quant_triton,
)


def _compare(out, ref, exact=None):
    """exact: the float64 values quantized, where known. A different fp32 rounding (division, rsqrt)
    may flip a code that sits on a rounding tie by 1: allowed only at ties of `exact` (within 1e-4
    of k + 0.5 codes), else only rarely. Unnormalized fp16 rows hit exact ties often: without
    the weight, code = 127 * x / max|x|, a ratio of two fp16 values."""
    (q, s, xs), (qr, sr, xsr) = out, ref
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and xs.dtype == torch.float32
    assert int(q.min()) >= -127  # -128 is the poison value
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1
    if exact is None:
        assert int((diff > 0).sum()) <= max(2, diff.numel() // 1000)
    else:
        codes = exact.double() * 127 / exact.double().abs().amax(-1, keepdim=True).clamp_min(1e-300)
        tie = (codes.abs().frac() - 0.5).abs() < 1e-4
        assert not ((diff > 0) & ~tie.to(diff.device)).any()
    assert rel_err(s, sr) < 1e-5
    # xsum = scale * sum(codes) of each side's own codes (a flipped tie moves it by one step)
    for codes, scale, total in ((q, s, xs), (qr, sr, xsr)):
        want = scale.double() * codes.double().sum(-1)
        assert torch.allclose(total.double(), want, rtol=1e-5, atol=1e-4 * float(scale.max()))
    assert ((xs.double() - xsr.double()).abs() <= sr.double() * diff.sum(-1).double() + 1e-3 * xsr.abs().max()).all()


def _dequant(q, s):
    return q.double() * s.double()[:, None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm_quant(dtype, with_weight, device, gen, poison):
    x = (torch.randn(5, 200, generator=gen) * 3).to(dtype).to(device)
    w = (torch.rand(200, generator=gen) + 0.5).to(dtype).to(device) if with_weight else None
    out = rmsnorm_quant_triton(x, w, 1e-6)
    ref = rmsnorm_quant_ref(x, w, 1e-6)
    # independent float64 rmsnorm: dequantized output within half a step of the true value
    xd = x.double()
    y = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() if w is not None else 1)
    _compare(out, ref, exact=y)
    assert ((_dequant(ref[0], ref[1]) - y).abs() <= ref[1].double()[:, None] * 0.5 + 1e-6).all()
    assert torch.allclose(ref[2].double(), _dequant(ref[0], ref[1]).sum(-1), rtol=1e-5, atol=1e-5)


def test_silu_mul_quant(device, gen, poison):
    gu = torch.randn(4, 2 * 96, generator=gen).half().to(device)
    out, ref = silu_mul_quant_triton(gu), silu_mul_quant_ref(gu)
    g, u = gu.double().chunk(2, -1)
    y = g * torch.sigmoid(g) * u
    _compare(out, ref, exact=y)
    assert rel_err(_dequant(ref[0], ref[1]), y) < 0.03


def test_quantize_per_token_with_zero_row(device, gen, poison):
    x = torch.randn(6, 128, generator=gen).half().to(device)
    x[2] = 0  # an all-zero row must give scale 0 and codes 0, not NaN
    out, ref = quantize_per_token_triton(x), quantize_per_token_ref(x)
    _compare(out, ref, exact=x)
    assert float(out[1][2]) == 0 and int(out[0][2].abs().max()) == 0
    assert rel_err(_dequant(*ref[:2]), x.double()) < 0.01


def test_reject_bad_input():
    with pytest.raises(ValueError):
        quantize_per_token_ref(torch.zeros(3, dtype=torch.float16))


@requires_cuda
def test_quant_real_shapes_gpu(gen, poison):
    x = torch.randn(300, 4096, generator=gen).half().cuda()
    w = torch.rand(4096, generator=gen).half().cuda() + 0.5
    _compare(rmsnorm_quant_triton(x, w, 1e-5), rmsnorm_quant_ref(x, w, 1e-5))
    gu = torch.randn(300, 2 * 14336, generator=gen).half().cuda()
    _compare(silu_mul_quant_triton(gu), silu_mul_quant_ref(gu))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rmsnorm_and_silu_mul_full_precision(dtype, device, gen, poison):
    x = (torch.randn(5, 200, generator=gen) * 3).to(dtype).to(device)
    w = (torch.rand(200, generator=gen) + 0.5).to(dtype).to(device)
    from qoq.kernels.quant import rmsnorm_ref, rmsnorm_triton, silu_mul_ref, silu_mul_triton

    out, ref = rmsnorm_triton(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(out, ref) < tol
    xd = x.double()
    assert rel_err(ref, xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()) < tol
    gu = torch.randn(4, 2 * 96, generator=gen).to(dtype).to(device)
    out, ref = silu_mul_triton(gu), silu_mul_ref(gu)
    assert out.dtype == dtype and out.shape == (4, 96)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows, width", [(5, 200), pytest.param(300, 4096, marks=requires_cuda)])
def test_add_rmsnorm_fused_residual(dtype, rows, width, device, gen, poison):
    """x + residual in one pass with the norm: the sum bit-equal to torch's add in x's dtype,
    and the normed / quantized rows equal to the unfused kernels run on that sum."""
    from qoq.kernels.quant import (
        add_rmsnorm_quant_ref,
        add_rmsnorm_quant_triton,
        add_rmsnorm_ref,
        add_rmsnorm_triton,
        rmsnorm_ref,
    )

    x = (torch.randn(rows, width, generator=gen) * 3).to(dtype).to(device)
    r = (torch.randn(rows, width, generator=gen) * 5).to(dtype).to(device)
    w = (torch.rand(width, generator=gen) + 0.5).to(dtype).to(device)
    *quant, s = add_rmsnorm_quant_triton(x, r, w, 1e-6)
    assert s.dtype == dtype and torch.equal(s, x + r)
    _compare(quant, rmsnorm_quant_ref(x + r, w, 1e-6))
    *quant_ref, s_ref = add_rmsnorm_quant_ref(x, r, w, 1e-6)
    assert torch.equal(s_ref, x + r)
    _compare(quant_ref, rmsnorm_quant_ref(x + r, w, 1e-6))
    y, s = add_rmsnorm_triton(x, r, w, 1e-6)
    assert torch.equal(s, x + r) and y.dtype == dtype
    assert rel_err(y, rmsnorm_ref(x + r, w, 1e-6)) < (2e-3 if dtype == torch.float16 else 1e-5)
    assert torch.equal(add_rmsnorm_ref(x, r, w, 1e-6)[0], rmsnorm_ref(x + r, w, 1e-6))
    with pytest.raises(ValueError, match="residual must match x"):
        add_rmsnorm_ref(x, r[:, :-1], w, 1e-6)
