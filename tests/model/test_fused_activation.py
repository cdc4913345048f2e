"""Quantized layers take int8 rows straight from the fused (residual add +) RMSNorm kernels, and
the gate/up GEMM applies SiLU*mul in its epilogue.

The fused norms compute exactly what the unfused ones do (norm in fp32, then the per-token
quantizer). The epilogue rounds silu(gate) * up to fp16 where the unfused path rounds gate and up:
the outputs agree to that rounding.
"""

import pytest
import torch

from qoq.config import ModelConfig, QuantConfig
from qoq.bench.random_model import random_model
from qoq.layers.activation import QuantizedActivation
from qoq.layers.quant_linear import QuantLinear

TINY = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128,
                            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "max_position_embeddings": 64})


@pytest.mark.parametrize("precision, group", [("w4a8kv4", 128), ("w4a8kv8", -1), ("w8a8kv8", -1)])
def test_fused_quantization_equals_the_unfused_path(monkeypatch, precision, group):
    model = random_model(TINY, QuantConfig(precision, group), device="cpu", dtype=torch.float32, seed=3)
    for layer in model.layers:  # non-trivial norm weights, so folding them in is exercised
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))

    seen = []
    original = QuantLinear.forward

    def spy(self, x, **kwargs):
        seen.append((isinstance(x, QuantizedActivation), kwargs.get("silu_mul", False)))
        return original(self, x, **kwargs)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    with torch.no_grad():
        fused = model(ids)
        # qkv and gate_up (after the norms) get int8 rows, gate_up applies SiLU*mul; o_proj and down
        # get fp rows (quantized by the layer).
        assert seen[:4] == [(True, False), (False, False), (True, True), (False, False)]
        monkeypatch.setattr(QuantLinear, "accepts_int8", False)
        unfused = model(ids)
    assert (fused - unfused).abs().max() <= 2e-3 * unfused.abs().max()  # measured: 1.5e-5 to 4.5e-4
