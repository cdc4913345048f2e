"""GPTQ-style error-compensating rounding of weights whose scales QoQ has already chosen.

QoQ fixes every scale first (level-1 s1, clipping ratios, level-2 s2 and zeros for g128; the
per-channel uint4 scale and zero; the int8 scale of W8). Round-to-nearest then picks each integer
code on its own. GPTQ (Frantar et al., 2022) picks the codes column by column instead and moves
each column's rounding error onto the columns not yet rounded, weighted by the inverse of the
input Gram matrix H = X^T X, so the errors cancel in the layer's output X W^T rather than in W.

Only the integer codes change: the result is the same params object with the same scales, so the
packed format, the checkpoints, the integer reference path and the kernels take it unchanged.
Every format here dequantizes as W ~ q * a - b with a fixed per (row, column) step a and offset b:

- progressive g128: W ~ (q4 * s2 - sz) * s1, a = s1 * s2, b = s1 * sz (per group), q4 in 0..15
  and additionally (q4 - z) * s2 inside the range RTN can reach from |Q8| <= 119, so Q8' stays in
  int8 (the kernel computes it in byte lanes);
- per-channel uint4: W ~ q4 * s - szero (fp16 s and szero, as the kernel applies them), q4 in 0..15;
- W8: W ~ w8 * s, w8 in -127..127.

Columns are processed in the stored order, which for g128 with reordering is already the
salience order (the reordering permuted the weight). `act_order` optionally processes them by
decreasing H diagonal instead (the scales stay fixed per group, so any order is valid).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from qoq.kernels.gptq_block import gptq_block
from qoq.layers.formats import W4ChannelParams, W4G128Params, W8Params, pad_k
from qoq.quant.quantizer import PROTECTIVE_MAX


def _code_grid(params, n: int, k: int):
    """(a, b, lo, hi, group): dequantized = q * a - b with codes in [lo, hi], each fp32 [G, N] per
    (quantization group, row), and group [Kp] the group of every column. fp32 holds every a and b
    exactly (an fp16 scale times an integer of at most 8 bits)."""
    device = codes_of(params).device
    if isinstance(params, W4G128Params):
        gs = params.group_size
        s1 = params.s1.float()[:, None]
        s2, sz = params.s2.float(), params.sz.float()
        reach = torch.round(PROTECTIVE_MAX / s2)  # |round(Q8 / s2)| RTN can produce from |Q8| <= 119
        z = sz / s2
        lo, hi = (z - reach).clamp(min=0), (z + reach).clamp(max=15)
        group = torch.arange(k, device=device) // gs
        return (s2 * s1).T.contiguous(), (sz * s1).T.contiguous(), lo.T.contiguous(), hi.T.contiguous(), group
    if isinstance(params, W4ChannelParams):
        rng = (0.0, 15.0)
        a, b = params.scale.float()[None, :], params.szero.float()[None, :]
    elif isinstance(params, W8Params):
        rng = (-127.0, 127.0)
        a, b = params.scale.float()[None, :], torch.zeros(1, n, device=device)
    else:
        raise TypeError(f"GPTQ rounding does not know {type(params).__name__}")
    lo, hi = torch.full_like(a, rng[0]), torch.full_like(a, rng[1])
    return a.contiguous(), b.contiguous(), lo, hi, torch.zeros(k, dtype=torch.long, device=device)


def _with_codes(params, codes: torch.Tensor):
    if isinstance(params, W8Params):
        return dataclasses.replace(params, w8=codes.to(torch.int8))
    return dataclasses.replace(params, q4=codes.to(torch.uint8))


def codes_of(params) -> torch.Tensor:
    return params.w8 if isinstance(params, W8Params) else params.q4


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, float64; columns no
    input ever reaches (zero padding, dead channels) get a unit diagonal so they stay decoupled.

    With J the order reversal and J H J = M M^T (lower Cholesky), U = J M^-1 J: one factorization
    and one triangular inverse, instead of inverting H and factorizing the inverse."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    for attempt in range(6):  # a Gram matrix from few tokens can be near singular: more damping
        m, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        if int(info) == 0:
            break
        h[diag, diag] += damp * torch.mean(torch.diag(h)) * 10 ** attempt
    else:
        raise ValueError("GPTQ: the input Gram matrix is not positive definite even with extra damping")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(m, eye, upper=False).flip(0, 1)


@contextlib.contextmanager
def _single_thread():
    """The column loop is thousands of small vector ops: intra-op threads only add overhead, and
    on a busy 2-core machine their spinning made it 20-50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, params, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False):
    """`params` (from quantize_weight on `w`) with its integer codes chosen by GPTQ under input Gram
    `h` [Kp, Kp]; every scale and zero is kept. Zero-padding columns stay at the code of 0."""
    wp = pad_k(w.float())
    n, k = wp.shape
    if h.shape != (k, k):
        raise ValueError(f"GPTQ: Gram matrix {tuple(h.shape)} does not match the padded weight [{n}, {k}]")
    h = h.to(wp.device)
    a, b, lo, hi, group = _code_grid(params, n, k)
    unreached = torch.diag(h) == 0
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        wp, group, h = wp[:, perm], group[perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, damp).float()
    wt = wp.T.contiguous()  # [Kp, N]: a column of W is one contiguous row
    wt[torch.diag(h) == 0] = 0
    codes = torch.empty(k, n, dtype=torch.float32, device=wp.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        with _single_thread():  # only the column loop: the factorization and GEMMs use every thread
            codes[i1:i2], err = gptq_block(wt[i1:i2], u[i1:i2, i1:i2].contiguous(), a, b, lo, hi, group[i1:i2])
        wt[i2:] -= u[i1:i2, i2:].T @ err
    codes = codes.T
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    # Columns no input reaches (the zero padding above all) keep RTN's code: padding must stay exactly 0.
    codes[:, unreached] = codes_of(params).float()[:, unreached]
    return _with_codes(params, codes)
