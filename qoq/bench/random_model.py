"""Models with random weights in the packed formats, built from a config kept in the repo.

Speed work needs no real checkpoint (and the GPU machine has no network): what matters is that
every tensor has the shape, dtype and layout the real packed model has, and values that keep the
forward pass finite.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from qoq.config import G128, Granularity, ModelConfig, QuantConfig
from qoq.distributed import TPGroup
from qoq.layers.formats import W4ChannelParams, W4G128Params, W8Params, padded_k
from qoq.layers.quant_linear import W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear
from qoq.model.llama import DecoderLayer, LlamaModel
from qoq.model.tensor_parallel import assemble

# Scales chosen so a dequantized weight is ~0.01-0.02 like a trained 7B model's, which keeps
# fp16 activations in range through 32+ layers with random data.
_W_STD = 0.02


def bundled_config(name: str) -> ModelConfig:
    """A config from qoq/configs (e.g. "llama-3-8b") or a path to an HF config.json."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        file = resources.files("qoq").joinpath(f"configs/{name}.json")
        if not file.is_file():
            known = sorted(p.name.removesuffix(".json") for p in resources.files("qoq").joinpath("configs").iterdir())
            raise ValueError(f"unknown config {name!r}: choose from {', '.join(known)} or pass a config.json")
        text = file.read_text()
    return ModelConfig.from_hf(json.loads(text))


def _random_linear(quant: QuantConfig, dtype: torch.dtype):
    def make(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        bias_t = torch.randn(out_features, dtype=dtype) * _W_STD if bias else None
        if quant.weight_bits == 16:
            layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
            nn.init.normal_(layer.weight, std=_W_STD)
            return layer
        kp = padded_k(in_features)
        if quant.weight_bits == 8:
            w8 = torch.randint(-119, 120, (out_features, kp), dtype=torch.int8)
            return W8A8Linear(in_features, W8Params(w8, torch.full((out_features,), _W_STD / 64, dtype=torch.float16)), bias_t)
        q4 = torch.randint(0, 16, (out_features, kp), dtype=torch.uint8)
        if not quant.granularity.per_channel:
            groups = kp // quant.granularity.group_size
            s2 = torch.randint(1, 9, (out_features, groups), dtype=torch.int8)  # <= 8: 15 * 8 fits int8
            sz = (torch.randint(0, 16, (out_features, groups), dtype=torch.int8) * s2).to(torch.int8)
            s1 = torch.full((out_features,), _W_STD / 64, dtype=torch.float16)
            return W4A8G128Linear(in_features, W4G128Params(q4, s1, s2, sz, quant.granularity.group_size), bias_t)
        scale = torch.full((out_features,), _W_STD / 4, dtype=torch.float16)
        return W4A8PerChannelLinear(in_features, W4ChannelParams(q4, scale, scale * 7.5), bias_t)

    return make


def bench_quant_config(precision: str, granularity: Granularity = G128) -> QuantConfig:
    """The quant config a benchmark's random model gets (the q/k Hadamard on whenever keys are
    quantized, as `qoq quantize` makes it, so the RoPE kernel's extra work is measured)."""
    quant = QuantConfig(precision, granularity)
    quant.qk_hadamard = quant.kv_bits < 16
    return quant


def random_model(config: ModelConfig, quant: QuantConfig, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.float16, seed: int = 0, tp: TPGroup | None = None) -> LlamaModel:
    """Random weights in `quant`'s packed format. With a group `tp`, rank tp.rank's shard of the
    same model: each part (the embedding / norm / head, then each decoder layer) is drawn whole
    on `device` from a seed of its own and sliced at once (tensor_parallel.assemble), so a rank
    holds its shard plus one whole layer, never the whole model, and the model is the same for
    every group size (a rank's shard equals shard_model of the one-process model)."""
    return assemble(config, quant, tp, _random_parts(config, quant, device, dtype, seed), "random_model", device)


def _random_parts(config: ModelConfig, quant: QuantConfig, device, dtype: torch.dtype, seed: int):
    """The model's tensors by state-dict name, a part at a time, every float one in `dtype`."""
    seeds = torch.randint(2**62, (config.num_layers + 1,), generator=torch.Generator().manual_seed(seed)).tolist()
    make = _random_linear(quant, dtype)
    with torch.device(device):
        torch.manual_seed(seeds[0])
        part = {"embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size, dtype=dtype),
                "norm.weight": torch.ones(config.hidden_size, dtype=dtype)}
        if not config.tie_word_embeddings:
            part["lm_head.weight"] = torch.randn(config.vocab_size, config.hidden_size, dtype=dtype) * _W_STD
    yield part
    for i in range(config.num_layers):
        with torch.device(device):
            torch.manual_seed(seeds[i + 1])
            layer = DecoderLayer(config, i, make)
        yield {f"layers.{i}.{name}": t.to(dtype) if t.is_floating_point() else t
               for name, t in layer.state_dict().items()}


def random_float_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A full-precision model with random weights, norms drawn from [1, 1.5) (so folding them is
    exercised) and unit-variance embeddings: the input of quantizer and engine tests."""
    torch.manual_seed(seed)
    model = LlamaModel(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.rand_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_()
    return model.eval()
