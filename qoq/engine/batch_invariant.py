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
- the quantized linears: their integer sums are exact, but the GEMM plan is chosen by M, and a
  split-K plan adds fp32 partials (its epilogue's order differs between kernels too), so on a GPU
  they also run row by row (`QuantLinear.forward`), each row on the M = 1 plan, with int8 rows
  from the row kernels (a decode-sized GEMM that quantizes its own rows rounds the same
  statistics in another order).
Everything else in a step is per token already (embedding, norms, RoPE, KV quantization). The
cost is in docs/serving.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from qoq.layers.activation import ROW_KERNELS_ONLY


class PerRowLinears(TorchFunctionMode):
    """Inside this mode every float F.linear of more than one row runs row by row, and every
    quantized linear takes its int8 input from a row kernel and (Triton) runs its GEMM row by row
    (activation.ROW_KERNELS_ONLY)."""

    def __enter__(self):
        self._row_kernels = ROW_KERNELS_ONLY.set(True)
        return super().__enter__()

    def __exit__(self, *exc):
        ROW_KERNELS_ONLY.reset(self._row_kernels)
        return super().__exit__(*exc)

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
