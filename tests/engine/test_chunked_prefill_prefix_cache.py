"""Chunked prefill and the prefix cache: the same tokens as one-step prefills without a cache,
pages shared, kept, evicted and released correctly (tiny W4A8 models: their linears are exact
integer arithmetic, so chunk shapes cannot move bits)."""

import pytest
import torch
from reference import assert_greedy_agrees

from qoq.config import G128
from qoq.engine import LLM, SamplingParams
from qoq.engine.block_manager import BlockManager
from qoq.engine.config import EngineConfig
from qoq.engine.llm_engine import LLMEngine
from qoq.engine.scheduler import Scheduler
from qoq.engine.sequence import Sequence
from tests.engine.test_engine import tiny_quantized_model

PAGE = 16


@pytest.fixture(scope="module")
def tiny_models():
    return {bits: tiny_quantized_model(G128, bits, torch.float32) for bits in (4, 8)}


def model_for(tiny_models, bits):
    return tiny_models[4 if bits == 16 else bits]  # KV16: the KV4 model with a 16-bit cache


def random_prompts(lengths, seed, prefix=()):
    gen = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(1, 256, (n,), generator=gen).tolist() for n in lengths]


def run(model, tok, prompts, params, **config):
    llm = LLM.from_model(model, tok, page_size=PAGE, **config)
    return [o.token_ids for o in llm.generate(prompts, params)], llm.engine


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_chunked_equals_unchunked_for_prompts_longer_than_the_budget(bundled, tiny_models, bits, async_scheduling):
    model, tok = model_for(tiny_models, bits), bundled[1]
    prompts = random_prompts((40, 70, 100, 5), seed=bits)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    common = dict(kv_bits=bits, enable_prefix_caching=False, async_scheduling=async_scheduling)
    chunked, engine = run(model, tok, prompts, params, max_num_batched_tokens=32, **common)
    whole, _ = run(model, tok, prompts, params, enable_chunked_prefill=False, max_num_batched_tokens=32, **common)
    assert engine.config.max_num_batched_tokens == 32  # not raised: chunks fit any budget
    assert chunked == whole
    # and the chunks' shared semantics are the reference's (a full recompute, no cache)
    assert assert_greedy_agrees(model, prompts, chunked, kv_bits=bits, tol=0.05) <= 2


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_flat_attention_steps_agree_with_the_reference(bundled, tiny_models, bits, async_scheduling):
    """prefill_graph_mode "full" (the default): steps with prompt tokens attend through launches of
    fixed grids, decode rows gathered into one decode launch and chunks through a work list
    (FlatAttention; on a GPU one CUDA graph holds the step). Chunks next to running decodes,
    prefix-cache hits included, give the reference's tokens and the piecewise mode's."""
    model, tok = model_for(tiny_models, bits), bundled[1]
    prompts = random_prompts((40, 70, 100, 5), seed=bits) + random_prompts((30, 9), seed=7, prefix=[5] * 40)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    common = dict(kv_bits=bits, async_scheduling=async_scheduling, max_num_batched_tokens=32)
    flat, engine = run(model, tok, prompts, params, prefill_graph_mode="full", **common)
    assert engine.runner.flat_attn.metadata.flat is not None  # its steps with prompt tokens ran flat
    piecewise, engine = run(model, tok, prompts, params, prefill_graph_mode="piecewise", **common)
    assert engine.runner.flat_attn is None
    assert flat == piecewise  # the same kernels, launched over fixed grids
    assert assert_greedy_agrees(model, prompts, flat, kv_bits=bits, tol=0.05) <= 2


class _EagerGraph:
    """Stands in for a captured graph of FullPrefillGraphs on the CPU: replay runs the forward on
    the static buffers, as the graph would."""

    def __init__(self, graphs, size):
        self.graphs, self.size = graphs, size

    def replay(self):
        g, n = self.graphs, self.size
        g.outputs[n].copy_(g.runner.model(g.input_ids[:, :n], g.positions[:, :n], g._attention(n))[0])
        g.replays += 1


@pytest.mark.parametrize("bits", [4, 16])
def test_full_prefill_graphs_buffers_give_the_eager_tokens(bundled, tiny_models, bits, monkeypatch):
    """FullPrefillGraphs.run without a GPU: each step copied into the static buffers (padding rows,
    the cu_seqlens tail, a work list of the graph's capacity) and its 'graph' run on them, the
    Triton work-list kernel under the interpreter; the tokens of the eager flat engine."""
    from qoq.engine import attention
    from qoq.engine.cuda_graph import FullPrefillGraphs
    from qoq.kernels.paged_prefill_attention import paged_prefill_attention_triton

    monkeypatch.setattr(attention, "paged_prefill_attention", paged_prefill_attention_triton)
    model, tok = model_for(tiny_models, bits), bundled[1]
    prompts = random_prompts((40, 21, 5), seed=bits)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    common = dict(kv_bits=bits, max_num_batched_tokens=32, max_num_seqs=4, prefill_graph_mode="full")
    expected, _ = run(model, tok, prompts, params, **common)
    llm = LLM.from_model(model, tok, page_size=PAGE, **common)
    graphs = FullPrefillGraphs(llm.engine.runner, 32)
    graphs.replays = 0
    for size in graphs.sizes:
        graphs.outputs[size] = torch.empty(size, model.config.hidden_size)
        graphs.graphs[size] = _EagerGraph(graphs, size)
    llm.engine.runner.prefill_graphs = graphs
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    assert graphs.replays >= 3  # 66 prompt tokens in steps of at most 32


def test_a_sequence_mid_prefill_samples_nothing(bundled, tiny_models):
    tok = bundled[1]
    engine = LLMEngine(tiny_models[4], tok, EngineConfig(max_num_batched_tokens=32, page_size=PAGE,
                                                         async_scheduling=False))
    engine.add_request(random_prompts([100], seed=3)[0], SamplingParams(max_tokens=3, ignore_eos=True), "r")
    seq = engine.requests["r"]
    for computed in (32, 64, 96):  # three chunks: no token, no output
        assert engine.step() == [] and seq.output_token_ids == [] and seq.num_computed_tokens == computed
    [out] = engine.step()  # the last chunk (4 tokens) samples the first token
    assert out.new_token_ids == seq.output_token_ids and len(seq.output_token_ids) == 1


def test_scheduler_fills_the_budget_with_decodes_first_then_chunks():
    bm = BlockManager(num_pages=64, page_size=4)
    sched = Scheduler(EngineConfig(max_num_batched_tokens=8), bm)
    a, b = (Sequence(r, list(range(1, n + 1)), SamplingParams(max_tokens=50)) for r, n in (("a", 3), ("b", 20)))
    sched.add(a)
    assert [c.num_tokens for c in sched.schedule().chunks] == [3]
    a.output_token_ids.append(7)
    sched.add(b)
    batch = sched.schedule()
    assert batch.decodes == [a] and [(c.seq, c.start, c.num_tokens, c.samples) for c in batch.chunks] == [(b, 0, 7, False)]
    assert batch.seqs == [a]  # b samples nothing yet
    a.output_token_ids.append(7)
    batch = sched.schedule()
    assert [(c.start, c.num_tokens) for c in batch.chunks] == [(7, 7)] and batch.num_tokens == 8
    a.output_token_ids.append(7)
    batch = sched.schedule()
    assert [(c.start, c.num_tokens, c.samples) for c in batch.chunks] == [(14, 6, True)] and batch.seqs == [b, a]


@pytest.mark.parametrize("bits", [4, 16])
def test_cached_prefix_gives_the_same_tokens(bundled, tiny_models, bits):
    model, tok = model_for(tiny_models, bits), bundled[1]
    prefix = random_prompts([3 * PAGE + 5], seed=4)[0]
    prompts = random_prompts((9, 1, 30), seed=5, prefix=prefix) + [prefix[: 2 * PAGE]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    llm = LLM.from_model(model, tok, page_size=PAGE, kv_bits=bits, max_num_batched_tokens=32)
    first = llm.generate(prompts[:1], params)  # computes the prefix and leaves it in the cache
    cached = [o.token_ids for o in first + llm.generate(prompts[1:], params)]
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 3 * PAGE * 2 + PAGE  # 3 pages twice, the last prompt's first page
    assert stats.prefix_cache_queries == sum(map(len, prompts))
    uncached, _ = run(model, tok, prompts, params, kv_bits=bits, enable_prefix_caching=False)
    assert cached == uncached


def fake(rid, tokens):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=50))


def prefill(bm, seq):
    prefix = bm.cached_prefix(seq)
    assert bm.can_allocate_prefill(seq, prefix)
    bm.allocate_prefill(seq, prefix)
    seq.num_computed_tokens = seq.num_tokens  # as if its chunks ran


def test_pages_are_kept_shared_and_evicted_least_recently_released_first():
    bm = BlockManager(num_pages=6, page_size=4, enable_prefix_caching=True)
    a = fake("a", range(1, 11))  # 2 full pages + 2 tokens
    prefill(bm, a)
    bm.free(a)  # its 2 full pages stay cached, the partial one is free
    assert bm.num_free_pages == 6 and len(bm.evictable) == 2 and bm.ref_counts == [0] * 6
    b, c = fake("b", range(1, 10)), fake("c", range(1, 12))  # both share a's first 2 pages
    for s in (b, c):
        prefill(bm, s)
    assert b.block_table[:2] == c.block_table[:2] == list(bm.cached.values())
    assert bm.ref_counts[b.block_table[0]] == 2 and b.num_computed_tokens == 9
    bm.free(b)  # aborted: the shared pages stay with c
    assert bm.ref_counts[c.block_table[0]] == 1 and not bm.evictable
    bm.free(c)
    assert all(n == 0 for n in bm.ref_counts) and bm.num_free_pages == 6
    # Pressure: a 6-page sequence takes the free pages first, then evicts the cached ones.
    d = fake("d", range(100, 124))
    prefill(bm, d)
    assert not bm.cached and not bm.page_key and bm.num_free_pages == 0
    bm.free(d)
    assert bm.num_free_pages == 6 and min(bm.ref_counts) == 0


def test_a_prompt_wholly_cached_still_computes_its_last_token():
    bm = BlockManager(num_pages=6, page_size=4, enable_prefix_caching=True)
    a = fake("a", range(1, 9))  # exactly 2 pages
    prefill(bm, a)
    bm.free(a)
    b = fake("b", range(1, 9))
    prefix = bm.cached_prefix(b)
    assert len(prefix[0]) == 1  # the second page would leave nothing to compute
    bm.allocate_prefill(b, prefix)
    assert b.num_computed_tokens == 4 and len(b.block_table) == 2


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_preemption_and_aborts_with_shared_pages(bundled, tiny_models, async_scheduling):
    model, tok = tiny_models[4], bundled[1]
    prefix = random_prompts([2 * PAGE], seed=6)[0]
    prompts = random_prompts((5, 20, 11, 3, 17, 8), seed=7, prefix=prefix)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference, _ = run(model, tok, prompts, params, enable_prefix_caching=False, enable_chunked_prefill=False)
    # 12 pages for 6 requests of up to 5 pages each: preemption by recompute, resumed from the
    # prefix pages that survive; one more request is aborted mid-way.
    engine = LLMEngine(model, tok, EngineConfig(num_pages=12, page_size=PAGE, max_num_batched_tokens=24,
                                                async_scheduling=async_scheduling))
    for i, p in enumerate(prompts):
        engine.add_request(p, params, f"r{i}")
    engine.add_request(prompts[0][:-1], params, "gone")
    outputs = {}
    for step in range(10_000):
        if step == 6:
            engine.abort_request("gone")
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.token_ids)
            assert min(engine.block_manager.ref_counts) >= 0
        if not engine.has_unfinished_requests():
            break
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == reference
    stats = engine.stats()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
    assert engine.block_manager.num_used_pages == 0 and set(engine.block_manager.ref_counts) == {0}
