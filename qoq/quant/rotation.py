"""RMSNorm folding and the block input rotation (QuaRot-style, docs/quantization.md#rotation).

Rotation: the residual stream x becomes x Q with Q = diag(signs) H / sqrt(n), H a Hadamard
matrix of order n = hidden size. Hidden sizes of the supported models are 2^a * m with small odd
m, so H is the Kronecker product of a Sylvester matrix (power of two) and one "core" Hadamard
matrix built by Paley's constructions (order q + 1 for a prime q = 3 mod 4, order 2(q + 1) for a
prime q = 1 mod 4). SmolLM2's 576 = 36 x 16: Paley II (q = 17) x Sylvester 16. Llama 5120 = 20 x
256 (Paley I, q = 19), 14336 = 28 x 512 (Paley II, q = 13). A hidden size with no such
factorisation gets a clear error (no block-diagonal fallback is needed by the supported models).
"""

from __future__ import annotations

import functools

import torch

from qoq.config import ModelConfig
from qoq.model.llama import DecoderLayer, LlamaModel


class RotationError(ValueError):
    """No Hadamard construction for this size."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 (mod 4)."""
    jac = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q = 1 (mod 4)."""
    jac = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jac
    # Conference matrix c: its zero diagonal becomes [[1, -1], [-1, -1]], each +-1 becomes +-[[1, 1], [1, -1]].
    on = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    diag = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, on) + torch.kron(torch.eye(q + 1, dtype=torch.float64), diag)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _core(m: int) -> tuple[torch.Tensor, str] | None:
    """A Paley Hadamard matrix of order m, if one construction applies."""
    if m in (1, 2):
        return sylvester(m), f"sylvester({m})"
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1), f"paley1(q={m - 1})"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1), f"paley2(q={m // 2 - 1})"
    return None


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> tuple[torch.Tensor, str]:
    """(H of order n with H H^T = n I, float64; the construction's name)."""
    odd, two = n, 1
    while odd % 2 == 0:
        odd, two = odd // 2, two * 2
    core_two = 1
    while core_two <= two:  # smallest core m = odd * 2^c, the rest is Sylvester
        found = _core(odd * core_two)
        if found is not None:
            h, name = found
            rest = n // h.shape[0]
            return torch.kron(h, sylvester(rest)), f"{name} x sylvester({rest})"
        core_two *= 2
    raise RotationError(
        f"no Hadamard construction for size {n} = 2^k * {odd}: run quantize with --no-rotation"
    )


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Orthogonal Q = diag(random signs) H / sqrt(n) (float64) and its description."""
    h, name = hadamard(n)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return signs[:, None] * h / n**0.5, f"randomized hadamard {name} (seed {seed})"


def _scale_cols(w: torch.Tensor, g: torch.Tensor) -> None:
    w.copy_((w.double() * g.double().to(w.device)[None, :]).to(w.dtype))


@torch.no_grad()
def fold_layer_norms(layer: DecoderLayer) -> None:
    """Fold a decoder layer's RMSNorm weights into the linears that read them (W <- W diag(g), g <- 1)."""
    for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                         (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
        _scale_cols(linear.weight, norm.weight)
        norm.weight.fill_(1.0)


@torch.no_grad()
def fold_final_norm(model: LlamaModel) -> None:
    """Untie the LM head and fold the final norm into it (the embedding stays as it is)."""
    model.untie_lm_head()
    _scale_cols(model.lm_head.weight, model.norm.weight)
    model.norm.weight.fill_(1.0)


@torch.no_grad()
def fold_norms(model: LlamaModel) -> None:
    """Fold every RMSNorm weight into the linears that read it."""
    fold_final_norm(model)
    for layer in model.layers:
        fold_layer_norms(layer)


def _right(w: torch.Tensor, q: torch.Tensor, rows: int = 8192) -> None:
    """W <- W Q in float64 on Q's device, a slice of rows at a time (an embedding may not fit twice)."""
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows]
        block.copy_((block.to(q.device, torch.float64) @ q).to(w.device, w.dtype))


def _left(w: torch.Tensor, q: torch.Tensor) -> None:
    """W <- Q^T W (a linear writing into the rotated stream)."""
    w.copy_((q.T @ w.to(q.device, torch.float64)).to(w.device, w.dtype))


@torch.no_grad()
def rotate_globals(model: LlamaModel, q: torch.Tensor) -> None:
    """The embedding and the (untied, norm-folded) LM head read and write the rotated stream."""
    if model.lm_head is None or bool((model.norm.weight != 1).any()):
        raise RuntimeError("rotation needs the norms folded first (fold_norms, or fold_final_norm for the LM head)")
    _right(model.embed_tokens.weight, q)
    _right(model.lm_head.weight, q)


@torch.no_grad()
def rotate_layer(layer: DecoderLayer, q: torch.Tensor) -> None:
    """Rotate one decoder layer (its norms folded first): inputs W Q, outputs Q^T W."""
    if bool((layer.input_layernorm.weight != 1).any()) or bool((layer.post_attention_layernorm.weight != 1).any()):
        raise RuntimeError("rotation needs RMSNorm weights folded first (fold_norms, or fold_layer_norms per layer)")
    _right(layer.self_attn.qkv_proj.weight, q)
    _right(layer.mlp.gate_up_proj.weight, q)
    for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
        _left(lin.weight, q)
        if getattr(lin, "bias", None) is not None:
            lin.bias.copy_((lin.bias.to(q.device, torch.float64) @ q).to(lin.bias.device, lin.bias.dtype))


@torch.no_grad()
def rotate_model(model: LlamaModel, seed: int = 0) -> str:
    """Rotate the residual stream (needs fold_norms first). Returns the rotation's description."""
    q, name = rotation_matrix(model.config.hidden_size, seed)
    q = q.to(model.device)
    rotate_globals(model, q)
    for layer in model.layers:
        rotate_layer(layer, q)
    return name


@torch.no_grad()
def rotate_layer_values(layer: DecoderLayer, config: ModelConfig) -> str:
    """Rotate every value head of one layer by a head_dim Hadamard H (offline, exact): v_proj's
    rows of a kv head become H^T W_v (and its bias b H), o_proj's columns of every query head W_o H.

    Attention mixes tokens, not channels, so each head's output is o H and o_proj undoes it. The
    values a KV4 cache quantizes per token and head are v H: their outliers spread over the head
    (V4 error on SmolLM2 -0.26 ppl, docs/accuracy.md). No runtime cost. Returns the description."""
    cfg = config
    h, name = hadamard(cfg.head_dim)
    qkv, o = layer.self_attn.qkv_proj, layer.self_attn.o_proj
    h = (h / cfg.head_dim**0.5).to(qkv.weight.device)
    v_rows = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    wv = qkv.weight[v_rows].double().view(cfg.num_kv_heads, cfg.head_dim, -1)
    qkv.weight[v_rows] = (h.T @ wv).reshape(cfg.kv_size, -1).to(qkv.weight.dtype)
    if getattr(qkv, "bias", None) is not None:
        bv = qkv.bias[v_rows].double().view(cfg.num_kv_heads, cfg.head_dim)
        qkv.bias[v_rows] = (bv @ h).reshape(-1).to(qkv.bias.dtype)
    wo = o.weight.double().view(o.weight.shape[0], cfg.num_heads, cfg.head_dim)
    o.weight.copy_((wo @ h).reshape(o.weight.shape).to(o.weight.dtype))
    return f"per-head {name}"


def rotate_values(model: LlamaModel) -> str:
    """rotate_layer_values on every layer of `model`."""
    name = ""
    for layer in model.layers:
        name = rotate_layer_values(layer, model.config)
    return name
