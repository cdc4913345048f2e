"""Smoothing of the inputs that cannot be rotated for free: o_proj and down_proj
(docs/quantization.md#smoothing).

Per input channel s = max|X|^a / max|W|^(1-a): X <- X / s, W <- W * s. The 1/s folds into the
producer: v_proj rows for o_proj (per kv head, shared by the query heads of its group, so s is
tied across a GQA group), up_proj rows for down_proj. `a` is searched per layer on a grid to
minimize the error of the quantized layer's output on calibration tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qoq.config import ModelConfig
from qoq.model.llama import MLP, Attention
from qoq.layers.formats import fake_quantize_act

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass
class SmoothResult:
    alpha: float | None  # None: smoothing did not beat leaving the layer alone
    scale: torch.Tensor  # per input channel (producer-side shape: kv_size or intermediate)
    error: float
    base_error: float


def smooth_scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-4, max=1e4)


def _group_max(v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[q_size] per attention-output channel -> [kv_size], max over the query heads of a group."""
    g = config.num_queries_per_kv
    return v.view(config.num_kv_heads, g, config.head_dim).amax(1).reshape(-1)


def _expand(s_kv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return s_kv.view(config.num_kv_heads, 1, config.head_dim).expand(
        -1, config.num_queries_per_kv, -1).reshape(-1)


@torch.no_grad()
def search_smoothing(x: torch.Tensor, w: torch.Tensor, fake_weight: Callable[[torch.Tensor], torch.Tensor],
                     tie: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
                     untie: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
                     grid=ALPHA_GRID) -> SmoothResult:
    """Best alpha for a layer y = x W^T with quantized x (per-token int8) and W (fake_weight).

    `tie` reduces per-channel maxima to the shared scale's shape, `untie` expands it back.
    """
    x, w = x.float(), w.float()
    ref = x @ w.T

    def error(s_full: torch.Tensor) -> float:
        y = fake_quantize_act(x / s_full) @ fake_weight(w * s_full).T
        return (y - ref).pow(2).mean().item()

    x_amax, w_amax = tie(x.abs().amax(0)), tie(w.abs().amax(0))
    ones = torch.ones_like(x_amax)
    base = error(untie(ones))
    scored: dict[int, tuple[float, torch.Tensor]] = {}

    def score(i: int) -> float:
        if i not in scored:
            s = smooth_scale(x_amax, w_amax, grid[i])
            scored[i] = (error(untie(s)), s)
        return scored[i][0]

    # Every third alpha (and the last), then the two on each side of the best: 12 of the default
    # grid's 21 evaluations, the same choice wherever the error is unimodal at that resolution.
    coarse = sorted(set(range(0, len(grid), 3)) | {len(grid) - 1})
    center = min(coarse, key=score)
    best = min((i for i in range(center - 2, center + 3) if 0 <= i < len(grid)), key=score)
    err, s = scored[best]
    if err < base:
        return SmoothResult(grid[best], s, err, base)
    return SmoothResult(None, ones, base, base)


def search_o_proj(x: torch.Tensor, attn: Attention, config: ModelConfig, fake_weight) -> SmoothResult:
    return search_smoothing(x, attn.o_proj.weight, fake_weight,
                            tie=lambda v: _group_max(v, config), untie=lambda s: _expand(s, config))


def search_down_proj(x: torch.Tensor, mlp: MLP, fake_weight) -> SmoothResult:
    return search_smoothing(x, mlp.down_proj.weight, fake_weight)


def _scale_cols(w: torch.Tensor, s: torch.Tensor) -> None:
    w.copy_((w.double() * s.double()[None, :]).to(w.dtype))


def _scale_rows(w: torch.Tensor, s: torch.Tensor, rows: slice) -> None:
    w[rows] = (w[rows].double() / s.double()[:, None]).to(w.dtype)


@torch.no_grad()
def apply_o_proj_smoothing(attn: Attention, s_kv: torch.Tensor, config: ModelConfig) -> None:
    """v rows / s (per kv channel), o_proj columns * s (expanded to the query heads)."""
    start = config.q_size + config.kv_size
    _scale_rows(attn.qkv_proj.weight, s_kv, slice(start, start + config.kv_size))
    if attn.qkv_proj.bias is not None:
        b = attn.qkv_proj.bias
        b[start:] = (b[start:].double() / s_kv.double()).to(b.dtype)
    _scale_cols(attn.o_proj.weight, _expand(s_kv, config))


@torch.no_grad()
def apply_down_smoothing(mlp: MLP, s: torch.Tensor) -> None:
    """up rows / s, down_proj columns * s (SiLU(gate) * up is linear in up)."""
    inter = mlp.intermediate_size
    _scale_rows(mlp.gate_up_proj.weight, s, slice(inter, 2 * inter))
    _scale_cols(mlp.down_proj.weight, s)


def o_input_scale(s_kv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The per attention-output channel divisor that smoothing applies to o_proj's input."""
    return _expand(s_kv, config)


@torch.no_grad()
def apply_norm_smoothing(norm, linear, s: torch.Tensor) -> None:
    """Block inputs (qkv, gate_up): x / s folds into the RMSNorm weight, W * s into the columns.

    After rotation the norm weight is 1, so the rmsnorm_quant kernel applies exactly 1 / s."""
    norm.weight.copy_((norm.weight.double() / s.double()).to(norm.weight.dtype))
    _scale_cols(linear.weight, s)
