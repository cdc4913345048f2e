"""Deterministic serving (`EngineConfig.deterministic`): a token's numbers do not depend on what
else is in its step.

Float GEMMs pick their kernels (and so their reduction orders) by shape, and a step's shape is
its batch: the same row computed beside other rows can differ in the last bits, and a 4-bit KV
cache turns such a bit into a different code, then a different greedy token. Two places mix a
step's rows:
- the float linears (and the LM head): `PerRowLinears` runs each row as its own [1, K] product,
  one kernel whatever the batch;
- attention: `PagedAttention` (attention.py) attends each token, prompt tokens included, alone
  over its own causal context with the decode kernel, so chunking, the prefix cache and
  preemption see the same numbers too.
Everything else in a step is per token already (embedding, norms, RoPE, KV quantization, the
integer GEMMs of W4A8/W8A8). The cost is in docs/serving.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class PerRowLinears(TorchFunctionMode):
    """Inside this mode every float F.linear of more than one row runs row by row."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.is_floating_point() and x.dim() >= 2 and x.numel() > x.shape[-1]:
                rows = x.reshape(-1, x.shape[-1])
                out = torch.cat([F.linear(row, weight, bias) for row in rows.split(1)])
                return out.view(*x.shape[:-1], out.shape[-1])
        return func(*args, **kwargs)
