"""Calibration: real text through the model one decoder layer at a time (bounded memory).

For each layer we capture the inputs of its four linears and the post-RoPE keys on every
calibration token; the layer's output becomes the next layer's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.data.corpus import load_corpus
from qoq.eval.perplexity import tokenize_corpus
from qoq.layers.attention import CausalAttention
from qoq.model.llama import DecoderLayer, LlamaModel


@dataclass
class CalibConfig:
    num_seqs: int = 64
    seq_len: int = 512
    chunk_seqs: int = 8  # sequences per forward (bounds attention memory)


@dataclass
class LayerActivations:
    """Inputs of one decoder layer's linears, tokens flattened to rows (fp32)."""

    qkv_in: torch.Tensor  # [M, hidden]
    o_in: torch.Tensor  # [M, q_size]
    gate_up_in: torch.Tensor  # [M, hidden]
    down_in: torch.Tensor  # [M, intermediate]
    keys: torch.Tensor  # [M, num_kv_heads, head_dim], after RoPE
    output: torch.Tensor  # [num_seqs, seq_len, hidden]: the next layer's input


def calibration_tokens(tokenizer, cfg: CalibConfig, text: str | None = None) -> torch.Tensor:
    """[num_seqs, seq_len] windows spread evenly over the corpus' calib split."""
    ids = tokenize_corpus(tokenizer, text if text is not None else load_corpus("calib"))
    need = cfg.num_seqs * cfg.seq_len
    if ids.numel() < need:
        raise ValueError(f"calibration needs {need} tokens ({cfg.num_seqs} x {cfg.seq_len}), "
                         f"the text has {ids.numel()}: lower --calib-seqs or --calib-seq-len")
    stride = (ids.numel() - cfg.seq_len) // max(1, cfg.num_seqs - 1) if cfg.num_seqs > 1 else 0
    return torch.stack([ids[i * stride : i * stride + cfg.seq_len] for i in range(cfg.num_seqs)])


class _Rows:
    """fp32 rows [total, width] filled chunk by chunk in place (no list of copies to concatenate)."""

    def __init__(self, total: int) -> None:
        self.total, self.filled, self.data = total, 0, None

    def add(self, t: torch.Tensor) -> None:
        t = t.flatten(0, 1)  # [seqs, tokens, ...] -> [rows, ...]
        if self.data is None:
            self.data = torch.empty(self.total, *t.shape[1:], dtype=torch.float32, device=t.device)
        self.data[self.filled:self.filled + t.shape[0]] = t
        self.filled += t.shape[0]


class _KeyCapture(CausalAttention):
    """Causal attention without KV quantization that also records the rotated keys."""

    def __init__(self, keys: _Rows) -> None:
        super().__init__()
        self.keys = keys

    def __call__(self, layer_idx, q, k, v, positions, rotary):
        _, k_rot = rotary(positions, q, k)
        self.keys.add(k_rot)
        return super().__call__(layer_idx, q, k, v, positions, rotary)


@torch.no_grad()
def capture_layer(layer: DecoderLayer, x: torch.Tensor, rotary, chunk_seqs: int = 8) -> LayerActivations:
    """Run `layer` on x [n, T, hidden] (fp, as it is now) and record what its linears see."""
    total = x.shape[0] * x.shape[1]
    names = {"qkv_in": layer.self_attn.qkv_proj, "o_in": layer.self_attn.o_proj,
             "gate_up_in": layer.mlp.gate_up_proj, "down_in": layer.mlp.down_proj}
    seen = {k: _Rows(total) for k in names}
    hooks = [mod.register_forward_pre_hook(lambda _m, args, key=key: seen[key].add(args[0]))
             for key, mod in names.items()]
    keys = _Rows(total)
    backend = _KeyCapture(keys)
    output = torch.empty_like(x)
    try:
        for start in range(0, x.shape[0], chunk_seqs):
            chunk = x[start : start + chunk_seqs]
            positions = torch.arange(chunk.shape[1], device=chunk.device).expand(chunk.shape[:2])
            mlp_out, residual = layer(chunk, positions, rotary, backend)
            torch.add(residual, mlp_out, out=output[start : start + chunk_seqs])
    finally:
        for h in hooks:
            h.remove()
    return LayerActivations(**{k: v.data for k, v in seen.items()}, keys=keys.data, output=output)


@torch.no_grad()
def embed(model: LlamaModel, tokens: torch.Tensor) -> torch.Tensor:
    return model.embed_tokens(tokens.to(model.device))


def subsample_rows(x: torch.Tensor, max_rows: int, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of rows, for searches that need not see every token."""
    if x.shape[0] <= max_rows:
        return x
    gen = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=gen)[:max_rows].to(x.device)]
