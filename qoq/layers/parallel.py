"""The pieces of a tensor-parallel model that are layers: the vocab-split embedding, and how a
linear's stored tensors split by input columns in each packed format (docs/parallel.md).

Splitting by output rows needs nothing format-specific: every buffer of every format (float or
int8 weight, packed W4 rows, s1 / s / szero, group scales s2 / sz, bias) is indexed by the
output channel in dim 0. Splitting by input columns does: scales per output channel stay whole,
group scales split with their groups, and packed W4 splits on its 128-channel chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qoq.distributed import TPGroup
from qoq.kernels import pack_w4, unpack_w4
from qoq.layers.formats import KERNEL_K_MULTIPLE, padded_k

# Buffers of a linear that hold one value per output channel: whole on every rank of an input split.
PER_OUTPUT_CHANNEL = {"s1", "s", "szero"}
PER_GROUP = {"s2", "sz"}  # [N, K / group_size] (W4 g128)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the (zero-padded) embedding: each rank looks up the ids it
    holds, zeros the others, and the sum over the ranks is the lookup. `weight` keeps the name
    nn.Embedding gives it, so a tied LM head reads this rank's vocab slice."""

    def __init__(self, rows: int, hidden_size: int, start: int, tp: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.start = start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[..., None], 0)
        return self.tp.all_reduce(out)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.weight.shape[0]} of the vocabulary"


def slice_input_columns(buffer: str, t: torch.Tensor, k0: int, k1: int, in_features: int,
                        group_size: int = KERNEL_K_MULTIPLE) -> torch.Tensor:
    """Input channels [k0, k1) of one stored tensor of a linear with `in_features` inputs, laid
    out as a linear with k1 - k0 inputs stores it (K padded to 128 where the format pads)."""
    if buffer in PER_OUTPUT_CHANNEL:
        return t.clone()
    if buffer in PER_GROUP:
        if k0 % group_size or (k1 % group_size and k1 != in_features):
            raise ValueError(f"a g{group_size} weight splits only at multiples of {group_size} input "
                             f"channels, not at {k0}..{k1}")
        return t[:, k0 // group_size: -(-k1 // group_size)].clone()
    if buffer == "qweight":  # packed W4: 128 channels a 64-byte chunk (docs/formats.md#packed-w4-layout)
        if k0 % KERNEL_K_MULTIPLE == 0 and (k1 % KERNEL_K_MULTIPLE == 0 or k1 == in_features):
            return t[:, k0 // 2: padded_k(k1) // 2].clone()  # whole chunks: a byte slice
        return pack_w4(_pad(unpack_w4(t)[:, k0:k1]))  # W4 per channel split inside a chunk
    if buffer == "weight":
        if t.is_floating_point():  # full precision: exactly [N, K]
            return t[:, k0:k1].clone()
        return _pad(t[:, k0:k1])  # W8: padded to 128 like any packed weight
    raise ValueError(f"no input-column split for buffer {buffer!r} (a bias is added once, after the sum)")


def _pad(t: torch.Tensor) -> torch.Tensor:
    # Padding columns meet zero activation columns, so their codes never count.
    return F.pad(t, (0, padded_k(t.shape[1]) - t.shape[1])).contiguous()
