"""Activation-aware channel reordering for g128 weights (docs/quantization.md#reordering).

Input channels are sorted by activation salience (max |x| on calibration tokens) so that each
group of 128 holds channels of similar magnitude; the producer's output channels get the same
permutation so the activations arrive already permuted (nothing runs at serving time).
- down_proj: the intermediate channels are free to permute (gate, up rows and down columns).
- o_proj: the attention output of query head h comes from kv head h // g, so only the head_dim
  channels *within* a kv head may move, the same way for every query head of its group (v rows
  and o_proj columns).
The residual-stream inputs (qkv, gate_up) are not reordered: after the Hadamard rotation their
channels have near-equal magnitude, and a permutation there would have to reach the embedding.
"""

from __future__ import annotations

import torch

from qoq.config import ModelConfig
from qoq.model.llama import MLP, Attention


def salience_order(x_amax: torch.Tensor) -> torch.Tensor:
    return torch.argsort(x_amax, descending=True, stable=True)


@torch.no_grad()
def reorder_down_proj(mlp: MLP, x_amax: torch.Tensor) -> torch.Tensor:
    """Permute intermediate channels by salience; returns the permutation."""
    perm = salience_order(x_amax).to(mlp.down_proj.weight.device)
    inter = mlp.intermediate_size
    w = mlp.gate_up_proj.weight
    w.copy_(torch.cat([w[:inter][perm], w[inter:][perm]]))
    mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    return perm


def o_proj_permutation(x_amax: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """[q_size] salience -> permutation of the kv channels [kv_size], head-local."""
    d, g = config.head_dim, config.num_queries_per_kv
    per_kv = x_amax.view(config.num_kv_heads, g, d).amax(1)
    local = torch.stack([salience_order(row) for row in per_kv])
    return (local + torch.arange(config.num_kv_heads, device=local.device)[:, None] * d).reshape(-1)


@torch.no_grad()
def reorder_o_proj(attn: Attention, x_amax: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Permute v rows and o_proj columns within heads; returns the o_proj column permutation."""
    perm_kv = o_proj_permutation(x_amax, config).to(attn.o_proj.weight.device)
    start = config.q_size + config.kv_size
    w = attn.qkv_proj.weight
    w[start:] = w[start:][perm_kv]
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias[start:] = attn.qkv_proj.bias[start:][perm_kv]
    d, g = config.head_dim, config.num_queries_per_kv
    local = perm_kv.view(config.num_kv_heads, d) % d
    cols = torch.cat([local[h // g] + h * d for h in range(config.num_heads)])
    attn.o_proj.weight.copy_(attn.o_proj.weight[:, cols])
    return cols
