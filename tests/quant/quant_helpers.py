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
