"""The kernel warm-up (engine/warmup.py): its step-size classes cover every plan the linears can
take, and its dummy steps run through the paged backend without touching a real cache."""

import pytest
import torch

from qoq.config import G128, PER_CHANNEL
from qoq.engine.warmup import dummy_prefill, scratch_cache, step_sizes, warm_up
from qoq.kernels.kv_cache import rope_options
from tests.engine.test_engine import tiny_quantized_model


def _plan_key(model, m: int) -> tuple:
    linears = {}
    for module in model.modules():
        if getattr(module, "gemm_mode", None) is not None:
            linears.setdefault((module.out_features, module.padded_in, module.gemm_mode), module)
    rope = tuple(tuple(rope_options(m, model.config.num_heads, had).items()) for had in (False, True))
    return tuple(layer.gemm_plan(m) for layer in linears.values()), rope, m % 16 == 0, m == 1


@pytest.mark.parametrize("granularity", [G128, PER_CHANNEL], ids=["g128", "per-channel"])
def test_step_sizes_meet_every_variant_once(granularity):
    model = tiny_quantized_model(granularity, 4, torch.float32)
    sizes = step_sizes(model, 700)
    assert sizes[0] == 1 and sizes == sorted(set(sizes)) and sizes[-1] <= 700
    every = {_plan_key(model, m) for m in range(1, 701)}
    met = [_plan_key(model, m) for m in sizes]
    assert len(set(met)) == len(met)  # one step per variant...
    assert set(met) == every  # ...and none missed
    assert len({key[0] for key in every}) > 1  # the CPU fallback plans differ by size too


def test_dummy_prefill_splits_rows_at_max_len_and_writes_nothing():
    model = tiny_quantized_model(G128, 4, torch.float32)
    scratch = scratch_cache(model, 8, 4, torch.float32)
    before = [layer.k_cache.clone() for layer in scratch]
    hidden = dummy_prefill(model, scratch, 45, 16, 8)  # rows of 16, 16, 13 tokens
    assert hidden.shape == (1, 45, model.config.hidden_size) and torch.isfinite(hidden).all()
    # rows start at position 0 each: the first token of every row sees only itself
    assert torch.allclose(hidden[0, 0], hidden[0, 16]) and torch.allclose(hidden[0, 0], hidden[0, 32])
    assert all(torch.equal(b, layer.k_cache) for b, layer in zip(before, scratch))  # slot -1: no writes


def test_warm_up_runs_every_step_size_and_attention_shape():
    model = tiny_quantized_model(PER_CHANNEL, 4, torch.float32)
    warm_up(model, max_num_batched_tokens=80, max_num_seqs=4, max_model_len=64, page_size=8, kv_bits=4,
            kv_dtype=torch.float32)


def test_prefill_graph_sizes_cover_every_step_up_to_the_budget():
    from qoq.engine.cuda_graph import prefill_graph_sizes

    for budget in (16, 96, 1000, 4096, 8192):
        sizes = prefill_graph_sizes(budget)
        assert sizes == sorted(set(sizes)) and sizes[-1] == budget and sizes[0] <= 16
        # a step of n tokens pads to the next size: at most 2x for tiny steps, 1/8 from 1,024 tokens up
        for n in range(1024, budget + 1, 37):
            assert next(s for s in sizes if s >= n) <= n * 9 / 8 + 1
