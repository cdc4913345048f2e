"""The serving engine over 2 (and 4) CPU processes (gloo): LLM(tensor_parallel_size=2) against the
single-process engine on the same tiny random models (tests/parallel/test_tensor_parallel.py),
and a worker that dies while the group starts.

This process is rank 0 (engine/parallel.launch); rank 1 is a subprocess that builds the same
model from the same seed and keeps its shard.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from faults import DieWhileBuilding, DieWhileLoading, DieWhenUnpickled
from reference import assert_greedy_agrees, logits_of
from test_tensor_parallel import CONFIGS, build_model, split_reference

from qoq.bench.synthetic_tokenizer import synthetic_tokenizer
from qoq.engine.config import EngineConfig
from qoq.engine.llm import LLM
from qoq.engine.parallel import launch
from qoq.model.tensor_parallel import shard_model
from qoq.sampling import SamplingParams

PROMPTS = [[5, 17, 300, 999, 42, 7, 1000, 3], [9, 8, 7, 6, 5], list(range(100, 140))]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
# Small pages and few of them: prefill chunks, several pages a sequence, and (num_pages None)
# the page count each rank sizes for itself, agreed on as the smallest.
ENGINE = dict(page_size=8, max_num_batched_tokens=32, max_num_seqs=4, cpu_kv_cache_gib=0.01)


def _tokenizer():
    return synthetic_tokenizer(CONFIGS["gqa2"].vocab_size, None)


def _load(config_name: str, precision_name: str, tp):
    torch.set_num_threads(1)
    return shard_model(build_model(config_name, precision_name), tp), _tokenizer()


def _generate_tp(case, params, world_size: int = 2, **engine):
    llm = LLM.__new__(LLM)
    llm.engine = launch(functools.partial(_load, *case), EngineConfig(**{**ENGINE, **engine}), world_size, "gloo",
                        timeout_s=120)
    with llm:
        runner = llm.engine.runner
        # this rank's cache holds its own KV heads (2 KV heads over 2 ranks: one each; over 4 ranks
        # each KV head is replicated on the two ranks whose query heads read it)
        assert runner.kv_cache[0].k_cache.shape[1] == 1
        return [o.token_ids for o in llm.generate(PROMPTS, params)]


def _generate_single(model, params, **engine):
    llm = LLM.from_model(model, _tokenizer(), **{**ENGINE, **engine})
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_fp32_tp_engine_equals_single_process(async_scheduling):
    """fp32: the same float math summed in another order (rounding only), so greedy and seeded
    sampling pick the same tokens as one process (a near tie would show as a near tie below)."""
    case = ("gqa2", "fp32")
    model = build_model(*case)
    params = [GREEDY, SEEDED, GREEDY]
    got = _generate_tp(case, params, async_scheduling=async_scheduling)
    want = _generate_single(model, params, async_scheduling=async_scheduling)
    assert got[0] == want[0] and got[2] == want[2]
    assert got[1] == want[1]  # seeded sampling: same generator, same probabilities to ~1e-6
    assert_greedy_agrees(model, [PROMPTS[0], PROMPTS[2]], [got[0], got[2]], tol=1e-4)


def test_fp32_tp_engine_over_four_ranks_equals_single_process():
    """Four processes, fewer KV heads (2) than ranks: greedy tokens are one process's."""
    case = ("gqa2", "fp32")
    got = _generate_tp(case, [GREEDY] * 3, world_size=4)
    want = _generate_single(build_model(*case), [GREEDY] * 3)
    assert got == want


@pytest.mark.parametrize("precision, append", [("w4a8kv4-g128", "0"), ("w4a8kv4-per-channel", "0"),
                                               ("w4a8kv4-g128", "1")], ids=["g128", "per-channel", "g128-append"])
def test_quantized_tp_engine_agrees_with_single_process(precision, append, monkeypatch):
    """W4A8KV4: each rank quantizes its slice of the o_proj / down_proj input with its own scale
    (docs/parallel.md), so the TP engine is the one-process engine over `split_reference` (the
    same slices quantized in one process: the same integer products, the same KV4 pages per
    head), token for token. Against the plain one-process model the activation scales differ by
    up to half an int8 step, the activation quantization noise (test_tensor_parallel bounds it by
    5% of the logits' range): each greedy token must be the plain model's choice or within that
    of it. With QOQ_DECODE_APPEND=1 (every rank, the workers inherit it) the steps of decodes
    alone write each rank's K/V heads inside decode attention: the same tokens again."""
    from qoq.engine import attention

    monkeypatch.setenv("QOQ_DECODE_APPEND", append)
    appended, decode = [], attention.paged_decode_attention
    monkeypatch.setattr(attention, "paged_decode_attention",  # rank 0's launches (this process)
                        lambda *a, **kw: appended.append(kw.get("append") is not None) or decode(*a, **kw))
    case = ("gqa2", precision)
    model = build_model(*case)
    got = _generate_tp(case, GREEDY)
    assert any(appended) == (append == "1")
    assert got == _generate_single(split_reference(model, 2), GREEDY)
    scale = max(logits_of(model, p).abs().max().item() for p in PROMPTS)
    assert_greedy_agrees(model, PROMPTS, got, tol=0.05 * scale)


# A dead worker is seen within a poll (0.1 s) once rank 0 waits for it; the rest is starting the
# processes. The group's timeout, which the start once waited out, is 300 s.
START_FAILS_WITHIN_S = 60


@pytest.mark.parametrize("fault, message", [
    (DieWhileLoading(functools.partial(_load, "gqa2", "fp32"), rank=1, code=3),
     "tensor-parallel rank 1 exited with code 3 while loading its shard"),
    (DieWhenUnpickled(4), "tensor-parallel rank 1 exited with code 4 while joining the group"),
    (DieWhileBuilding(functools.partial(_load, "gqa2", "fp32"), "_pages_that_fit"),
     "tensor-parallel rank 1 exited with code 5 while building its engine"),
    (DieWhileBuilding(functools.partial(_load, "gqa2", "fp32"), "allocate_kv_cache"),
     "tensor-parallel rank 1 exited with code 5 while building its engine"),
], ids=["while-loading", "before-joining", "building-in-a-collective", "building-after-it"])
def test_a_worker_that_dies_at_start_fails_it_at_once_naming_its_rank(fault, message):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        launch(fault, EngineConfig(**ENGINE), 2, "gloo")  # the default 300 s timeout
    assert time.monotonic() - t0 < START_FAILS_WITHIN_S
    assert not dist.is_initialized()  # left, so that a later launch here starts afresh
    ps = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    assert "_worker_main" not in ps  # no worker left behind
