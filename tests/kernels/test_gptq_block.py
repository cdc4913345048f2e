"""GPTQ's per-block column loop: the Triton kernel against its torch twin, on fresh random data."""

import pytest
import torch
from conftest import requires_cuda

from qoq.kernels.gptq_block import gptq_block_ref, gptq_block_triton


def _block(bsz, n, groups, gen, device):
    """A block of columns, the upper factor of a random SPD inverse, and per-group code grids
    (with a column order that is not the group order, as act_order makes it)."""
    w = torch.randn(bsz, n, generator=gen) * 0.05
    m = torch.randn(bsz, 2 * bsz, generator=gen)
    u = torch.linalg.cholesky(torch.linalg.inv(m @ m.T / bsz + 0.1 * torch.eye(bsz)), upper=True)
    a = torch.rand(groups, n, generator=gen) * 0.01 + 0.002
    z = torch.randint(4, 12, (groups, n), generator=gen).float()
    b = z * a
    lo, hi = (z - 6).clamp(min=0), (z + 6).clamp(max=15)
    gidx = torch.randint(0, groups, (bsz,), generator=gen)
    return [t.to(device) for t in (w, u.float(), a, b, lo, hi, gidx)]


def _compare(out, ref):
    (codes, errs), (rcodes, rerrs) = out, ref
    assert torch.isfinite(errs).all() and torch.isfinite(codes).all()
    # fp32 in both; the GPU may contract multiply-adds and divide to within an ulp, which can move
    # a code sitting on a rounding tie (and, through its error, that row's later columns)
    mismatch = (codes != rcodes).float().mean().item()
    print(f"codes differing from the twin: {mismatch:.2e}")
    assert mismatch <= 1e-3
    rows = (codes == rcodes).all(0)  # weight rows (output channels) whose codes all agree
    assert rows.float().mean().item() >= 0.9
    assert torch.allclose(errs[:, rows], rerrs[:, rows], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bsz,n,groups", [(16, 40, 2), (32, 33, 1)])
def test_gptq_block_triton_matches_ref(bsz, n, groups, gen, device):
    args = _block(bsz, n, groups, gen, "cpu")
    ref = gptq_block_ref(*args)
    out = gptq_block_triton(*[t.to(device) for t in args], block_n=16)
    _compare(tuple(t.cpu() for t in out), ref)
    assert int(ref[0].min()) >= 0 and int(ref[0].max()) <= 15


def test_gptq_block_rejects_bad_shapes(gen):
    w, u, a, b, lo, hi, gidx = _block(16, 8, 1, gen, "cpu")
    with pytest.raises(ValueError, match="fp32"):
        gptq_block_ref(w.double(), u, a, b, lo, hi, gidx)
    with pytest.raises(ValueError, match="gidx"):
        gptq_block_ref(w, u, a, b, lo, hi, gidx[:3])
    with pytest.raises(ValueError, match="power-of-two"):
        gptq_block_triton(w[:12], u[:12, :12], a, b, lo, hi, gidx[:12])


@requires_cuda
@pytest.mark.parametrize("n,groups", [(4096, 112), (49152, 64), (14336, 1)])
def test_gptq_block_real_shapes_gpu(n, groups, gen):
    args = _block(128, n, groups, gen, "cpu")
    ref = gptq_block_ref(*args)
    out = gptq_block_triton(*[t.cuda() for t in args])
    _compare(tuple(t.cpu() for t in out), ref)
