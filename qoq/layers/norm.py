import torch
from torch import nn

from qoq.kernels import rmsnorm
from qoq.layers.activation import QuantizedActivation, rmsnorm_quantized


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor | QuantizedActivation:
        """quantize=True: int8 per token for a quantized linear, in one fused kernel."""
        if quantize:
            return rmsnorm_quantized(x, self.weight, self.eps)
        # One fused kernel on a GPU; statistics in fp32 whatever the storage dtype, as HF Llama does.
        return rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
