"""Tiny random models for the quantization tests."""

import torch

from qoq.bench.random_model import random_float_model
from qoq.config import ModelConfig
from qoq.model.llama import LlamaModel


def tiny_model(hidden=96, heads=4, kv_heads=2, head_dim=24, inter=160, layers=2, vocab=101, seed=0,
               dtype=torch.float64) -> LlamaModel:
    """A random Llama with non-trivial norms (so folding is exercised), float64 for exact checks."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_ids=[0])
    return random_float_model(cfg, seed, dtype)


def write_hf_folder(model: LlamaModel, folder, dtype=torch.float32, shards: int = 2):
    """`model` as a HuggingFace folder: config.json and HF-named safetensors in `shards` files
    with an index, as a downloaded model comes."""
    import json

    from safetensors.torch import save_file

    from qoq.model.weights import hf_config_dict, qoq_to_hf_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = qoq_to_hf_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, model.config)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
    return folder
