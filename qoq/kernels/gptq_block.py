"""GPTQ's inner loop over one block of weight columns, with every scale already fixed.

Rows of the weight (output channels) are independent in GPTQ: a column's rounding error only
moves onto the later columns of the *same* row. So one program owns a slice of rows and walks
the block's columns in order, holding the block in registers:

    for i in block:  q_i = clamp(round((w_i + b) / a), lo, hi)            (the code of column i)
                     e_i = (w_i - (q_i * a - b)) / U[i, i]                (its scaled error)
                     w_j -= U[i, j] * e_i  for the later columns j of the block

with U the upper Cholesky factor of the inverse Hessian (qoq/quant/gptq.py) and (a, b, lo, hi)
the dequantization step, offset and code range of the column's quantization group. The caller
applies the block's errors to the columns after it with one GEMM, so no Python loop ever runs
per column on the GPU.

Layouts ([columns, rows], a weight column is one contiguous row): W [B, N] fp32 (the block's
columns, already updated by earlier blocks), U [B, B] fp32 (the block's diagonal block of the
factor), A / Bz / LO / HI [G, N] fp32 per (group, row), GIDX [B] int32 (the group of each
column; columns may come in any order: act_order). Out: codes [B, N] and errors [B, N], fp32.
"""

from __future__ import annotations

import torch

from qoq.kernels.dispatch import dispatch, lazy_jit

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None



def _check(w, u, a, b, lo, hi, gidx):
    bsz, n = w.shape
    if w.dtype != torch.float32 or u.shape != (bsz, bsz) or u.dtype != torch.float32:
        raise ValueError(f"gptq_block needs fp32 W [B, N] and U [B, B], got {w.dtype} {tuple(w.shape)}, "
                         f"{u.dtype} {tuple(u.shape)}")
    for name, t in (("a", a), ("b", b), ("lo", lo), ("hi", hi)):
        if t.dim() != 2 or t.shape[1] != n or t.dtype != torch.float32:
            raise ValueError(f"gptq_block: {name} must be fp32 [G, {n}], got {t.dtype} {tuple(t.shape)}")
    if gidx.shape != (bsz,):
        raise ValueError(f"gptq_block: gidx must be [{bsz}], got {tuple(gidx.shape)}")


def gptq_block_ref(w, u, a, b, lo, hi, gidx, step: int = 16):
    """(codes, errors), each fp32 [B, N]: the column loop in plain torch (fp32, as the kernel).
    Columns go `step` at a time: a column's error updates the rest of its step one by one, and
    each step's errors reach the block's later columns in one matrix product (the same sums,
    without rewriting the whole block per column)."""
    _check(w, u, a, b, lo, hi, gidx)
    w = w.clone()
    codes, errs = torch.empty_like(w), torch.empty_like(w)
    # per column of the block: its group's step, offset and code range, [B, N] each
    ac, bc, loc, hic = (t.index_select(0, gidx.to(t.device)) for t in (a, b, lo, hi))
    diag = torch.diagonal(u).tolist()
    bsz = w.shape[0]
    for s1 in range(0, bsz, step):
        s2 = min(s1 + step, bsz)
        for i in range(s1, s2):
            q = torch.add(w[i], bc[i], out=codes[i]).div_(ac[i]).round_().clamp_(min=loc[i], max=hic[i])
            e = torch.addcmul(bc[i], q, ac[i], value=-1, out=errs[i]).add_(w[i]).div_(diag[i])
            if i + 1 < s2:
                w[i + 1:s2].addcmul_(u[i, i + 1:s2, None], e[None, :], value=-1)
        if s2 < bsz:
            w[s2:].addmm_(u[s1:s2, s2:].T, errs[s1:s2], alpha=-1)
    return codes, errs


@lazy_jit
def _gptq_block_kernel(W, U, A, BZ, LO, HI, GIDX, CODES, ERRS, N, B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, B)
    w = tl.load(W + cols[None, :] * N + rows[:, None], mask=rmask[:, None], other=0.0)  # [BLOCK_N, B]
    for i in range(B):
        g = tl.load(GIDX + i)
        a = tl.load(A + g * N + rows, mask=rmask, other=1.0)
        b = tl.load(BZ + g * N + rows, mask=rmask, other=0.0)
        lo = tl.load(LO + g * N + rows, mask=rmask, other=0.0)
        hi = tl.load(HI + g * N + rows, mask=rmask, other=0.0)
        wi = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)
        q = ((wi + b) / a + 12582912.0) - 12582912.0  # round half to even (fp32)
        q = tl.minimum(tl.maximum(q, lo), hi)
        e = (wi - (q * a - b)) / tl.load(U + i * B + i)
        tl.store(CODES + i * N + rows, q, mask=rmask)
        tl.store(ERRS + i * N + rows, e, mask=rmask)
        urow = tl.load(U + i * B + cols, mask=cols > i, other=0.0)
        w = w - e[:, None] * urow[None, :]


def gptq_block_triton(w, u, a, b, lo, hi, gidx, block_n: int = 32):
    _check(w, u, a, b, lo, hi, gidx)
    bsz, n = w.shape
    if bsz & (bsz - 1):
        raise ValueError(f"the Triton GPTQ block needs a power-of-two block, got {bsz}")
    codes, errs = torch.empty_like(w), torch.empty_like(w)
    grid = (triton.cdiv(n, block_n),)
    _gptq_block_kernel[grid](w.contiguous(), u.contiguous(), a.contiguous(), b.contiguous(), lo.contiguous(),
                             hi.contiguous(), gidx.to(torch.int32).contiguous(), codes, errs, n,
                             B=bsz, BLOCK_N=block_n, num_warps=4)
    return codes, errs


gptq_block = dispatch(gptq_block_ref, gptq_block_triton)
