"""The throughput benchmark's machinery on the CPU: random packed models and a full engine run."""

import json

import pytest
import torch

from qoq.bench.random_model import bundled_config, random_model
from qoq.bench.throughput import run_throughput
from qoq.config import G128, PER_CHANNEL, QuantConfig
from qoq.layers.quant_linear import W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.mark.parametrize("precision, group, cls", [
    ("w4a8kv4", G128, W4A8G128Linear), ("w4a8kv4", PER_CHANNEL, W4A8PerChannelLinear), ("w8a8kv8", G128, W8A8Linear)])
def test_random_models_have_the_packed_layers_and_finite_outputs(tiny_config, precision, group, cls):
    model = random_model(bundled_config(tiny_config), QuantConfig(precision, group), device="cpu",
                         dtype=torch.float32)
    assert isinstance(model.layers[0].self_attn.qkv_proj, cls)
    logits = model.compute_logits(model(torch.randint(0, 256, (2, 9))))
    assert torch.isfinite(logits).all()


def test_run_throughput_generates_every_token(tiny_config):
    result = run_throughput(tiny_config, "w4a8kv4", G128, batch=3, input_len=12, output_len=5, device="cpu")
    assert result.batch == 3 and result.tokens_per_s > 0 and result.seconds > 0
    assert result.decode_forward_ms <= result.decode_step_ms
    phases = result.phases  # every prompt token prefilled once; the rest of the tokens decoded
    assert sum(p["prefill_tokens"] for p in phases.values()) == 3 * 12
    assert sum(p["decode_tokens"] for p in phases.values()) <= 3 * (5 - 1)
    assert sum(p["seconds"] for p in phases.values()) <= result.seconds + 1e-3


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="unknown config 'gpt-9'"):
        bundled_config("gpt-9")
