"""The engine on a GPU: KV-cache sizing from free memory, Triton kernels, CUDA graphs = eager."""

import pytest
import torch
from reference import assert_greedy_agrees, check_launches_never_wait

from qoq.bench.random_model import random_model
from qoq.config import G128, PER_CHANNEL, ModelConfig, QuantConfig
from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _generate(engine: LLMEngine, prompts, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


@pytest.mark.parametrize("precision, group", [("w4a8kv4", PER_CHANNEL), ("w4a8kv4", G128), ("w16a16kv16", G128)])
def test_graphs_equal_eager_and_the_cache_is_sized_from_free_memory(precision, group):
    model = random_model(ModelConfig.from_hf(TINY), QuantConfig(precision, group), device="cuda")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 64, 65, 130, 7, 200)]
    outputs = []
    for eager in (False, True):
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_model_len=256, enforce_eager=eager,
                                                     gpu_memory_utilization=0.5))
        assert engine.runner.num_pages >= 8 * 4  # free memory sizing found room for every sequence
        assert (engine.runner.graphs is None) == eager
        assert (engine.runner.prefill_graphs is None) == eager
        outputs.append(_generate(engine, prompts, 24))
        del engine
    assert outputs[0] == outputs[1]
    assert all(len(o) == 24 for o in outputs[0])


@pytest.mark.parametrize("mode", ["piecewise", "full"])
@pytest.mark.parametrize("precision, group", [("w4a8kv4", G128), ("w16a16kv16", G128)])
def test_prefill_graphs_equal_eager_for_chunked_mixed_steps(precision, group, mode):
    """Steps with prompt tokens replay piecewise graphs (cuda_graph.PrefillGraphs) with the real
    attention between them, or whole graphs with attention inside (FullPrefillGraphs: the eager
    engine of that mode attends flat too): chunks reading earlier chunks' pages next to running
    decodes, padded to the captured sizes, give the eager engine's tokens."""
    model = random_model(ModelConfig.from_hf(TINY), QuantConfig(precision, group), device="cuda", seed=3)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 64, 65, 130, 7, 200, 150, 3)]
    outputs = []
    for eager in (False, True):
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_model_len=256, max_num_batched_tokens=96,
                                                     enforce_eager=eager, gpu_memory_utilization=0.5,
                                                     prefill_graph_mode=mode))
        runs = [0]
        if not eager:
            graphs = engine.runner.prefill_graphs
            assert graphs is not None and graphs.sizes[-1] == 96
            run = graphs.run

            def counted(inputs, attn, run=run):
                runs[0] += 1
                return run(inputs, attn)

            graphs.run = counted
        outputs.append(_generate(engine, prompts, 16))
        assert eager or runs[0] >= 7  # 8 prompts of 614 tokens in steps of at most 96
        del engine
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("precision, group, qk_hadamard", [
    ("w4a8kv4", PER_CHANNEL, False), ("w4a8kv4", G128, True), ("w4a8kv8", G128, False), ("w16a16kv16", G128, False)])
def test_engine_agrees_with_the_reference_on_the_gpu(precision, group, qk_hadamard):
    """The engine's Triton kernels and CUDA graphs against the reference (tests/reference.py: a
    full recompute through the no-cache backend, the kernels' torch twins for KV4/KV8)."""
    quant = QuantConfig(precision, group, qk_hadamard=qk_hadamard)
    model = random_model(ModelConfig.from_hf(TINY), quant, device="cuda", seed=1)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (9, 64, 100, 31)]
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.5))
    served = _generate(engine, prompts, 20)
    # Same semantics, other numbers: fp16 GEMMs of other shapes, other attention kernels. Each
    # token must be the reference's greedy choice after the engine's own earlier tokens, up to a
    # near tie, and near ties decided the other way must be rare (80 choices).
    assert assert_greedy_agrees(model, prompts, served, tol=0.1) <= 8


def _run(engine: LLMEngine, prompts, params: list[SamplingParams]) -> list[list[int]]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_async_scheduling_equals_sync_and_launching_never_waits(eager):
    """Async and synchronous scheduling give the same tokens (greedy, engine-seeded and request-
    seeded sampling, a request joining mid-run), and launching a step (inputs up, pending tokens
    gathered on the device, forward or graph replay, sampling, the copy back started) performs no
    synchronizing CUDA call: torch.cuda.set_sync_debug_mode("error") raises on any."""
    model = random_model(ModelConfig.from_hf(TINY), QuantConfig("w4a8kv4", PER_CHANNEL), device="cuda", seed=2)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 64, 65, 130, 7, 33)]
    base = dict(ignore_eos=True, detokenize=False)
    params = [SamplingParams(max_tokens=24, **base), SamplingParams(max_tokens=17, temperature=0.8, **base),
              SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, **base),
              SamplingParams(max_tokens=9, temperature=0.7, seed=5, **base),
              SamplingParams(max_tokens=1, **base), SamplingParams(max_tokens=20, temperature=1.2, seed=6, **base)]
    outputs = {}
    for async_scheduling in (True, False):
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_model_len=256, enforce_eager=eager,
                                                     gpu_memory_utilization=0.5, async_scheduling=async_scheduling))
        _run(engine, prompts[:2], params[:2])  # warm-up: Triton compiles and autotunes, pinned pool
        launches = check_launches_never_wait(engine.runner) if async_scheduling else [0]
        outputs[async_scheduling] = _run(engine, prompts, params)
        assert not async_scheduling or launches[0] >= 24
        del engine
    assert outputs[True] == outputs[False]
    assert [len(o) for o in outputs[True]] == [p.max_tokens for p in params]


def test_a_warmed_engine_compiles_no_kernel_while_serving():
    """engine/warmup.py: every Triton variant a step can need is compiled at start, so mixed steps
    of any size (decodes plus prompt chunks, arriving at different times) compile nothing."""
    import triton

    model = random_model(ModelConfig.from_hf(TINY), QuantConfig("w4a8kv4", G128), device="cuda")
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=16, max_model_len=512, max_num_batched_tokens=320,
                                                 gpu_memory_utilization=0.5))
    compiled = []

    def hook(**kwargs):
        compiled.append(str(kwargs.get("fn", kwargs.get("repr"))))
        return False  # go on compiling: the hook only records

    previous, triton.knobs.runtime.jit_cache_hook = triton.knobs.runtime.jit_cache_hook, hook
    try:
        gen = torch.Generator().manual_seed(1)
        params = SamplingParams(max_tokens=40, ignore_eos=True, detokenize=False)
        for wave in range(6):  # prompts of many lengths join a running batch
            for n in torch.randint(1, 480, (3,), generator=gen).tolist():
                engine.add_request(torch.randint(0, 512, (n,), generator=gen).tolist(), params)
            for _ in range(3 + wave):
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
    assert compiled == []
