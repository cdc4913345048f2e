"""Loaders reject bad inputs with messages that say what is wrong."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qoq.model.loader import load_model, load_weights, resolve_model_path
from qoq.model.weights import LoadError


def _write_tiny(tmp_path, **overrides):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_missing_path():
    with pytest.raises(LoadError, match="does not exist"):
        resolve_model_path("/no/such/model")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(LoadError, match="not a .gguf file"):
        resolve_model_path(f)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises((LoadError, ValueError)):
        resolve_model_path(f)


def test_folder_without_config(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_unsupported_architecture(tmp_path):
    _write_tiny(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(LoadError, match="unsupported architecture"):
        load_weights(tmp_path)


def test_mismatched_shapes(tmp_path):
    _write_tiny(tmp_path, intermediate_size=40)
    with pytest.raises(LoadError, match="mismatched shape for layers.0.mlp"):
        load_weights(tmp_path)


def test_missing_tensor(tmp_path):
    _write_tiny(tmp_path, num_hidden_layers=2)
    with pytest.raises(LoadError, match="missing .*layers.1"):
        load_weights(tmp_path)


def test_corrupt_safetensors(tmp_path):
    _write_tiny(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoadError, match="cannot read safetensors"):
        load_weights(tmp_path)


def test_no_weights(tmp_path):
    _write_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no \\*.safetensors"):
        load_weights(tmp_path)


def test_bundled_model_loads_from_cache(bundled):
    model, tokenizer = bundled
    assert model.config.num_layers == 30 and model.config.num_kv_heads == 3
    assert model.config.tie_word_embeddings and model.lm_head is None
    again, _ = load_model()  # second load reads the cached safetensors copy
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)
    assert tokenizer.chat_template
