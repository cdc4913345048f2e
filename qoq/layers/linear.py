"""The one place linear layers are made, so precisions swap in without touching the model."""

from __future__ import annotations

from typing import Protocol

from torch import nn


class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, bias: bool, name: str) -> nn.Module: ...


def dense_linear(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
    """Full-precision linear (w16a16): the reference precision."""
    return nn.Linear(in_features, out_features, bias=bias)
