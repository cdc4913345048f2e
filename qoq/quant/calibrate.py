"""Calibration: real text through the model one decoder layer at a time (bounded memory).

For each layer we capture the inputs of its four linears on a fixed random sample of the
calibration tokens (every search prices candidates on at most that many), their per-channel
maxima and the post-RoPE keys on every token; the layer's output becomes the next layer's input.
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
    """Inputs of one decoder layer's linears, tokens flattened to rows (fp32): the sample's rows
    in row order (all M rows without a sample), and max |x| per input channel over all M."""

    qkv_in: torch.Tensor  # [S, hidden]
    o_in: torch.Tensor  # [S, q_size]
    gate_up_in: torch.Tensor  # [S, hidden]
    down_in: torch.Tensor  # [S, intermediate]
    o_amax: torch.Tensor  # [q_size]
    down_amax: torch.Tensor  # [intermediate]
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


class RowSample:
    """A fixed random draw of `size` of `total` rows. Captured rows are stored in row order (one
    contiguous gather per forward chunk); `first(x, k)` gives the draw's first k of them, so each
    search's sample is the start of the next larger one (smoothing's rows are the clip search's
    first, which are GPTQ's first)."""

    def __init__(self, total: int, size: int, seed: int, device: torch.device | str = "cpu") -> None:
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(size, total)]
        rows, where = perm.sort()
        self.size = perm.numel()
        self.all = self.size == total
        self.rows = rows.to(device)  # sorted row indices
        self.draw_order = torch.argsort(where).to(device)  # stored position of the draw's j-th row

    def first(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The first k rows of the draw, from rows stored in row order (all of x when k covers it)."""
        return x if k >= self.size else x[self.draw_order[:k]]

    def between(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the draw (all of x when that is every row)."""
        return x if start == 0 and stop >= self.size else x[self.draw_order[start:stop]]


class _Rows:
    """fp32 rows filled chunk by chunk in place (no list of copies to concatenate): every row, or
    the sample's rows; with `amax`, also max |x| per channel over every row."""

    def __init__(self, total: int, sample: RowSample | None = None, amax: bool = False) -> None:
        self.total, self.filled, self.data = total, 0, None
        self.rows = None if sample is None or sample.all else sample.rows
        self.amax = torch.tensor(0.0) if amax else None

    def add(self, t: torch.Tensor) -> None:
        t = t.flatten(0, 1)  # [seqs, tokens, ...] -> [rows, ...]
        lo, hi = self.filled, self.filled + t.shape[0]
        if self.data is None:
            size = self.total if self.rows is None else self.rows.numel()
            self.data = torch.empty(size, *t.shape[1:], dtype=torch.float32, device=t.device)
        if self.rows is None:
            self.data[lo:hi] = t
        else:  # the sample's rows in this chunk are a contiguous run of the stored rows
            a, b = torch.searchsorted(self.rows, torch.tensor([lo, hi], device=self.rows.device)).tolist()
            torch.index_select(t.float(), 0, self.rows[a:b] - lo, out=self.data[a:b])
        if self.amax is not None:
            # amax and amin, not aminmax: torch's CPU aminmax over rows is ~10x slower
            high = torch.maximum(t.amax(0), t.amin(0).neg_()).float()
            self.amax = torch.maximum(self.amax.to(t.device), high)
        self.filled = hi


class _KeyCapture(CausalAttention):
    """Causal attention without KV quantization that also records the rotated keys."""

    def __init__(self, keys: _Rows) -> None:
        super().__init__()
        self.keys = keys

    def __call__(self, layer_idx, q, k, v, positions, rotary):
        q, k = rotary(positions, q, k)
        self.keys.add(k)
        return self.attend(q, k, v)


@torch.no_grad()
def capture_layer(layer: DecoderLayer, x: torch.Tensor, rotary, chunk_seqs: int = 8,
                  sample: RowSample | None = None) -> LayerActivations:
    """Run `layer` on x [n, T, hidden] (fp, as it is now) and record what its linears see: the
    sample's rows (flat token indices), or every row."""
    total = x.shape[0] * x.shape[1]
    names = {"qkv_in": layer.self_attn.qkv_proj, "o_in": layer.self_attn.o_proj,
             "gate_up_in": layer.mlp.gate_up_proj, "down_in": layer.mlp.down_proj}
    seen = {k: _Rows(total, sample, amax=k in ("o_in", "down_in")) for k in names}
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
    return LayerActivations(**{k: v.data for k, v in seen.items()}, o_amax=seen["o_in"].amax,
                            down_amax=seen["down_in"].amax, keys=keys.data, output=output)


@torch.no_grad()
def embed(model: LlamaModel, tokens: torch.Tensor) -> torch.Tensor:
    return model.embed_tokens(tokens.to(model.device))
