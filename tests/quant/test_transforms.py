"""Before quantization, every QoQ transform leaves the float model's outputs unchanged."""

import pytest
import torch

from qoq.quant import smooth
from qoq.quant.calibrate import capture_layer, embed
from qoq.quant.reorder import reorder_down_proj, reorder_o_proj
from qoq.quant.rotation import RotationError, fold_norms, hadamard, rotate_model, rotate_values, rotation_matrix
from qoq.quant.smooth_attention import apply_smooth_attention, smooth_attention_scales


def _logits(model, tokens):
    with torch.no_grad():
        return model.compute_logits(model(tokens)).double()


@pytest.mark.parametrize("n", [12, 20, 28, 36, 96, 576, 1024])
def test_hadamard_orthogonal(n):
    h, _ = hadamard(n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.allclose(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q, _ = rotation_matrix(n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hidden_size_without_hadamard():
    with pytest.raises(RotationError, match="--no-rotation"):
        hadamard(100)


def test_fold_and_rotate_preserve_outputs(tiny, tokens):
    ref = _logits(tiny, tokens)
    fold_norms(tiny)
    assert (_logits(tiny, tokens) - ref).abs().max() < 1e-5 * ref.abs().max()  # fp32 norm / RoPE math
    name = rotate_model(tiny)
    assert "paley1(q=11)" in name  # 96 = 12 x 8
    assert (_logits(tiny, tokens) - ref).abs().max() < 1e-5 * ref.abs().max()  # fp32 norm / RoPE math


def test_value_rotation_preserves_outputs_and_rotates_each_head(tiny, tokens):
    """Per-head Hadamard of the values (GQA: 4 query heads read 2 value heads, head_dim 24)."""
    ref = _logits(tiny, tokens)
    cfg = tiny.config
    rows = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    wv = tiny.layers[0].self_attn.qkv_proj.weight[rows].clone()
    assert "paley1(q=11)" in rotate_values(tiny)
    assert (_logits(tiny, tokens) - ref).abs().max() < 1e-5 * ref.abs().max()  # fp32 attention math
    h = hadamard(cfg.head_dim)[0] / cfg.head_dim**0.5
    new = tiny.layers[0].self_attn.qkv_proj.weight[rows].view(cfg.num_kv_heads, cfg.head_dim, -1)
    assert torch.allclose(new, h.T @ wv.view(cfg.num_kv_heads, cfg.head_dim, -1))


def test_rotate_needs_folded_norms(tiny):
    with pytest.raises(RuntimeError, match="fold_norms"):
        rotate_model(tiny)


def _scores(model, layer_idx, tokens):
    """q . k after RoPE for every head, from the model's own projections."""
    cfg = model.config
    acts = capture_layer(model.layers[layer_idx], embed(model, tokens), model.rotary)
    x = acts.qkv_in.double()
    q, k, _ = model.layers[layer_idx].self_attn.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], -1)
    pos = torch.arange(tokens.shape[1]).repeat(tokens.shape[0])
    q, k = model.rotary(pos, q.view(-1, cfg.num_heads, cfg.head_dim), k.view(-1, cfg.num_kv_heads, cfg.head_dim))
    k = k.repeat_interleave(cfg.num_queries_per_kv, dim=1)
    return torch.einsum("thd,shd->hts", q, k), acts


def test_smooth_attention_keeps_scores_and_flattens_keys(tiny, tokens):
    cfg = tiny.config
    ref, acts = _scores(tiny, 0, tokens)
    lam = smooth_attention_scales(acts.keys, 0.5)
    half = cfg.head_dim // 2
    assert torch.equal(lam[:, :half], lam[:, half:])  # RoPE pairs share lambda
    apply_smooth_attention(tiny.layers[0].self_attn, lam, cfg)
    new, acts2 = _scores(tiny, 0, tokens)
    assert (new - ref).abs().max() < 1e-5 * ref.abs().max()
    spread = lambda k: (k.abs().amax(0).max() / k.abs().amax(0).min()).item()  # noqa: E731
    assert spread(acts2.keys) < spread(acts.keys)


def test_smoothing_and_reordering_preserve_outputs(tiny, tokens):
    cfg = tiny.config
    ref = _logits(tiny, tokens)
    gen = torch.Generator().manual_seed(3)
    for layer in tiny.layers:
        s_kv = torch.rand(cfg.kv_size, generator=gen, dtype=torch.float64) + 0.5
        smooth.apply_o_proj_smoothing(layer.self_attn, s_kv, cfg)
        smooth.apply_down_smoothing(layer.mlp, torch.rand(cfg.intermediate_size, generator=gen, dtype=torch.float64) + 0.5)
        smooth.apply_norm_smoothing(layer.input_layernorm, layer.self_attn.qkv_proj,
                                    torch.rand(cfg.hidden_size, generator=gen, dtype=torch.float64) + 0.5)
        reorder_o_proj(layer.self_attn, torch.rand(cfg.q_size, generator=gen), cfg)
        reorder_down_proj(layer.mlp, torch.rand(cfg.intermediate_size, generator=gen))
    assert (_logits(tiny, tokens) - ref).abs().max() < 1e-5 * ref.abs().max()  # fp32 norm / RoPE math


def test_o_proj_reorder_is_head_local_and_gqa_tied(tiny):
    cfg = tiny.config
    cols = reorder_o_proj(tiny.layers[0].self_attn, torch.rand(cfg.q_size), cfg)
    d, g = cfg.head_dim, cfg.num_queries_per_kv
    blocks = cols.view(cfg.num_heads, d)
    for h in range(cfg.num_heads):
        assert set(blocks[h].tolist()) == set(range(h * d, (h + 1) * d))
        assert torch.equal(blocks[h] - h * d, blocks[(h // g) * g] - (h // g) * g * d)


@torch.no_grad()
def test_bundled_model_rotation_576(bundled):
    """SmolLM2's hidden 576 = Paley II (q = 17) x Sylvester 16 keeps its logits (fp32)."""
    import copy

    model, tokenizer = bundled
    model = copy.deepcopy(model)
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")["input_ids"]
    ref = model.compute_logits(model(ids))
    fold_norms(model)
    assert "paley2(q=17)" in rotate_model(model)
    out = model.compute_logits(model(ids))
    assert (out - ref).abs().max() < 2e-3 * ref.abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
