"""Tiny random models for the quantization tests."""

import torch

from qoq.config import ModelConfig
from qoq.model.llama import LlamaModel


def tiny_model(hidden=96, heads=4, kv_heads=2, head_dim=24, inter=160, layers=2, vocab=101, seed=0,
               dtype=torch.float64) -> LlamaModel:
    """A random Llama with non-trivial norms (so folding is exercised), float64 for exact checks."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_ids=[0])
    model = LlamaModel(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.rand_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_()
    return model.eval()
