import torch
from torch import nn

from qoq.kernels import add_rmsnorm, rmsnorm
from qoq.kernels.quant import ACT_ADD_RMSNORM, ACT_RMSNORM, ActInput
from qoq.layers.activation import (DeferredActivation, QuantizedActivation, add_rmsnorm_quantized,
                                   rmsnorm_quantized)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, quantize: bool = False, residual: torch.Tensor | None = None,
                defer: bool = False):
        """quantize=True: int8 per token for a quantized linear, in one fused kernel.

        With `residual`, the norm is of s = x + residual (the decoder's residual add, fused into
        the same kernel) and the result is (normed, s).

        defer=True (with quantize): nothing runs here; the result is a DeferredActivation that the
        linear after it quantizes in its own GEMM (and s, with `residual`, is written there).
        """
        if quantize and defer:
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            if residual is None:
                return DeferredActivation(ActInput(flat, ACT_RMSNORM, None, self.weight, self.eps), x.shape[:-1], x.dtype)
            s = torch.empty_like(flat)
            act = ActInput(flat, ACT_ADD_RMSNORM, residual.reshape(-1, flat.shape[1]).contiguous(), self.weight,
                           self.eps, s)
            return DeferredActivation(act, x.shape[:-1], x.dtype), s.view(x.shape)
        if residual is not None:
            if quantize:
                return add_rmsnorm_quantized(x, residual, self.weight, self.eps)
            flat = x.shape[-1]
            y, s = add_rmsnorm(x.reshape(-1, flat), residual.reshape(-1, flat), self.weight, self.eps)
            return y.view(x.shape), s.view(x.shape)
        if quantize:
            return rmsnorm_quantized(x, self.weight, self.eps)
        # One fused kernel on a GPU; statistics in fp32 whatever the storage dtype, as HF Llama does.
        return rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
