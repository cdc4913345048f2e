"""The engine against the dense reference generator, on the bundled model (fp32, CPU), and on
tiny W4A8 models from the quantizer."""

import pytest
import torch
import torch.nn.functional as F

from qoq.bench.random_model import random_float_model
from qoq.config import G128, PER_CHANNEL, Granularity, ModelConfig, RopeScaling
from qoq.engine import LLM, SamplingParams
from qoq.generate import apply_chat_template, generate
from qoq.kernels import dequantize_kv_ref, quantize_kv_ref
from qoq.layers.attention import CausalAttention, DenseKVCache
from qoq.layers.quant_linear import W4A8G128Linear, W4A8PerChannelLinear
from qoq.layers.rotary import RotaryEmbedding
from qoq.model.llama import LlamaModel
from qoq.quant.pipeline import QoQOptions, quantize_model

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a young girl who loved to read books about",
    "List three colors:",
    "1, 2, 3, 4,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def prompts(bundled):
    model, tok = bundled
    ids = [tok(t)["input_ids"] for t in TEXTS]
    return ids + [apply_chat_template(tok, "What is the capital of France?")]  # ends on EOS


@pytest.fixture(scope="module")
def reference(bundled, prompts):
    """qoq.generate one prompt at a time (no padding): the outputs the engine must reproduce.

    The engine runs them batched, so these agree in tokens, not in every bit (see the exact tests
    below): at KV16 in fp32 a last-bit difference does not flip a greedy choice in 10 tokens."""
    model, tok = bundled
    return [generate(model, tok, [p], SamplingParams(max_tokens=MAX_TOKENS))[0] for p in prompts]


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def async_scheduling(request):
    """EngineConfig.async_scheduling: both must give qoq.generate's outputs (hence each other's)."""
    return request.param


def assert_same(outputs, reference):
    for out, ref in zip(outputs, reference, strict=True):
        assert out.token_ids == ref.token_ids
        assert out.text == ref.text
        assert out.finish_reason == ref.finish_reason


def test_fp_cache_matches_reference_generator(bundled, prompts, reference, async_scheduling):
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=16, async_scheduling=async_scheduling)
    assert_same(llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS)), reference)
    assert {r.finish_reason for r in reference} == {"length", "stop"}


def test_token_ids_only_without_detokenization(bundled, prompts, reference):
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=16)
    outs = llm.generate(prompts[:3], SamplingParams(max_tokens=MAX_TOKENS, detokenize=False))
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference[:3]]
    assert all(o.text == "" for o in outs)


# Exact equality, greedy for greedy. qoq.generate's default "serving" KV mode has the engine's
# semantics (every query over the quantized cache, the prompt included) and runs the same
# attention ops, so the two compute the same numbers when they run the same shapes. Shapes matter
# on the CPU: MKL computes an fp32 GEMM of fewer than 8 rows with other kernels, whose rows differ
# in the last bits from the same rows in a larger GEMM, so an fp32 model's engine output for a
# prompt depends on its batch-mates (chaotically so at KV4). These tests therefore give the engine
# and qoq.generate the same batch, every request running to the end (ignore_eos, one max_tokens):
# the engine prefills them in one packed step and decodes them together, as generate's padded
# batch does. (W4A8 linears are exact integer arithmetic: of a quantized model only the fp LM head
# still sees the batch shape.)
EXACT_TEXTS = TEXTS[:3] + ["Les feux d'artifice 🎆 du 14 juillet à Paris, 東京の花火"]


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_engine_equals_generator_greedy_at_every_kv_precision(bundled, bits):
    model, tok = bundled
    prompts = [tok(t)["input_ids"] for t in EXACT_TEXTS]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outputs = LLM.from_model(model, tok, kv_bits=bits).generate(prompts, params)
    assert_same(outputs, generate(model, tok, prompts, params, kv_bits=bits))


def tiny_quantized_model(granularity: Granularity, kv_bits: int, dtype: torch.dtype, qk_hadamard: bool = False) -> LlamaModel:
    """A random tiny Llama through the quantizer (RTN) into the integer W4A8 linears."""
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_ids=[0])
    model = random_float_model(cfg)
    options = QoQOptions.rtn(precision=f"w4a8kv{kv_bits}", granularity=granularity, progress=False,
                             qk_hadamard=qk_hadamard)
    quantize_model(model, options=options, calib_tokens=torch.zeros(1, 1, dtype=torch.long))
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("granularity, linear", [(G128, W4A8G128Linear), (PER_CHANNEL, W4A8PerChannelLinear)],
                         ids=["g128", "per-channel"])
def test_w4a8_engine_equals_generator_greedy(bundled, granularity, linear, kv_bits, dtype, async_scheduling):
    _, tok = bundled
    model = tiny_quantized_model(granularity, kv_bits, dtype)
    assert isinstance(model.layers[0].mlp.down_proj, linear) and model.quant_config.kv_bits == kv_bits
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (1, 3, 9, 17, 30, 64)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs = LLM.from_model(model, tok, async_scheduling=async_scheduling).generate(prompts, params)  # own kv_bits
    reference = generate(model, tok, prompts, params)
    assert_same(outputs, reference)
    assert len({t for r in reference for t in r.token_ids}) > 20  # a model with something to say


@pytest.mark.parametrize("kv_bits", [4, 16])
def test_qk_hadamard_engine_equals_generator_and_keeps_fp_scores(bundled, kv_bits, async_scheduling):
    """The q/k Hadamard after RoPE: the engine (rope_kv_write's rotation, rotated cache) and
    qoq.generate agree; with a 16-bit cache the rotation changes no logit beyond rounding."""
    _, tok = bundled
    model = tiny_quantized_model(G128, 4, torch.float32, qk_hadamard=True)
    assert model.quant_config.qk_hadamard
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (1, 5, 20, 64)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outputs = LLM.from_model(model, tok, kv_bits=kv_bits, async_scheduling=async_scheduling).generate(prompts, params)
    assert_same(outputs, generate(model, tok, prompts, params, kv_bits=kv_bits))
    tokens = torch.tensor([prompts[2]])
    with torch.no_grad():
        rotated = model.compute_logits(model(tokens, attn=CausalAttention(kv_bits, qk_hadamard=True)))
        plain = model.compute_logits(model(tokens, attn=CausalAttention(kv_bits, qk_hadamard=False)))
    if kv_bits == 16:
        torch.testing.assert_close(rotated, plain, rtol=1e-4, atol=1e-4)
    else:  # the rotation is applied: 4-bit keys quantize differently
        assert not torch.allclose(rotated, plain)


def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_kv_ref(*quantize_kv_ref(x, bits), bits, dtype=x.dtype)


def _sdpa(q, k, v, causal):  # [T, H, D] each, GQA
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(0, 1)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_serving_kv_mode_semantics_against_sdpa(bits):
    """DenseKVCache "serving", checked independently of the kernels with SDPA: a left-padded
    prompt attends causally over quantize->dequantize(K/V) of its tokens (what the pages hold,
    so a prompt's numbers do not depend on chunking or cached prefixes); each later token over
    that of every token so far, itself included; padding never attends or is attended to."""
    rot = RotaryEmbedding(16, 64, 10000.0, RopeScaling())
    gen = torch.Generator().manual_seed(0)
    pad = torch.tensor([0, 3])
    batch, prompt_len, (hq, hkv, d) = 2, 7, (4, 2, 16)
    cache = DenseKVCache(1, batch, 12, hkv, d, torch.float32, pad_lens=pad, kv_bits=bits, mode="serving",
                         page_size=4)

    def randn(t, h):
        return torch.randn(batch, t, h, d, generator=gen)

    q, k, v = randn(prompt_len, hq), randn(prompt_len, hkv), randn(prompt_len, hkv)
    positions = (torch.arange(prompt_len)[None] - pad[:, None]).clamp(min=0)
    out = cache(0, q, k, v, positions, rot)
    cache.advance(prompt_len)
    keys, values = [], []
    for b in range(batch):
        p = int(pad[b])
        qr, kr = rot(positions[b, p:], q[b, p:], k[b, p:])
        keys.append(_fake_quant(kr, bits) if bits < 16 else kr)
        values.append(_fake_quant(v[b, p:], bits) if bits < 16 else v[b, p:])
        torch.testing.assert_close(out[b, p:], _sdpa(qr, keys[b], values[b], causal=True))
    next_pos = positions[:, -1] + 1
    for _ in range(3):
        q, k, v = randn(1, hq), randn(1, hkv), randn(1, hkv)
        out = cache(0, q, k, v, next_pos[:, None], rot)
        cache.advance(1)
        for b in range(batch):
            qr, kr = rot(next_pos[b, None], q[b], k[b])
            keys[b] = torch.cat([keys[b], _fake_quant(kr, bits) if bits < 16 else kr])
            values[b] = torch.cat([values[b], _fake_quant(v[b], bits) if bits < 16 else v[b]])
            torch.testing.assert_close(out[b], _sdpa(qr, keys[b], values[b], causal=False))
        next_pos = next_pos + 1


def test_kv_modes_are_explicit():
    with pytest.raises(ValueError, match="mode must be one of"):
        DenseKVCache(1, 1, 8, 2, 16, torch.float32, mode="fresh")
    with pytest.raises(ValueError, match="needs mode 'fake_quant'"):
        DenseKVCache(1, 1, 8, 2, 16, torch.float32, kv_quantizer=lambda x: x, mode="serving")


def test_preemption_under_a_tiny_pool_loses_nothing(bundled, prompts, reference, async_scheduling):
    # 8 pages of 8 tokens hold ~2 of these sequences at once: most steps preempt someone (with
    # async scheduling, a sequence whose last token is still in flight).
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=8, num_pages=8, max_num_seqs=8,
                         async_scheduling=async_scheduling)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(outputs, reference)
    assert llm.engine.block_manager.num_free_pages == 8


def test_requests_join_the_running_batch(bundled, prompts, reference, async_scheduling):
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=16, async_scheduling=async_scheduling)
    engine = llm.engine
    shapes = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        shapes.append((len(batch.prefills), len(batch.decodes)))
        return batch

    engine.scheduler.schedule = recording_schedule
    params = SamplingParams(max_tokens=MAX_TOKENS)
    engine.add_request(prompts[0], params, "a")
    for _ in range(3):
        engine.step()
    engine.add_request(prompts[2], params, "b")
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert (1, 1) in shapes  # b's prefill ran in the same forward as a's decode
    assert_same([final["a"], final["b"]], [reference[0], reference[2]])


def test_seeded_sampling_matches_reference(bundled, prompts, async_scheduling):
    model, tok = bundled
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=1234)
    [ref] = generate(model, tok, [prompts[0]], params)
    llm = LLM.from_model(model, tok, kv_bits=16, page_size=16, async_scheduling=async_scheduling)
    a, b = llm.generate([prompts[0], prompts[0]], params)
    assert a.token_ids == b.token_ids == ref.token_ids


def test_streamed_deltas_add_up_and_hold_back_stop_strings(bundled, prompts, async_scheduling):
    model, tok = bundled
    params = SamplingParams(max_tokens=16, stop=["return"])
    [ref] = generate(model, tok, [prompts[1]], params)
    engine = LLM.from_model(model, tok, kv_bits=16, page_size=16, async_scheduling=async_scheduling).engine
    engine.add_request(prompts[1], params, "s")
    pieces, tokens, last = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            tokens += out.new_token_ids
            last = out
    assert last.finished and last.finish_reason == ref.finish_reason == "stop"
    assert "".join(pieces) == last.text == ref.text and "return" not in last.text
    assert tokens == last.token_ids == ref.token_ids


def model_vocab(engine):
    return engine.model.config.vocab_size


def test_abort_frees_pages_and_bad_requests_are_refused(bundled, prompts, async_scheduling):
    llm = LLM.from_model(*bundled, kv_bits=4, page_size=16, num_pages=4, async_scheduling=async_scheduling)
    engine = llm.engine
    engine.add_request(prompts[2], SamplingParams(max_tokens=8), "x")
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    out = engine.abort_request("x")
    assert out.finished and out.finish_reason == "abort"
    assert engine.block_manager.num_used_pages == 0
    if async_scheduling:  # x's prefill is still in flight: the next step processes (drops) it
        assert engine.has_unfinished_requests() and engine.step() == []
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request(prompts[0], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="whole cache holds 64"):
        engine.add_request(prompts[0], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request([model_vocab(engine)], SamplingParams())


def test_final_only_outputs(bundled, prompts, async_scheduling):
    """output_kind "final": one output per request, when it finishes, equal to the streamed end."""
    model, tok = bundled
    engine = LLM.from_model(model, tok, kv_bits=16, page_size=16, async_scheduling=async_scheduling).engine
    for i, kind in enumerate(("delta", "final")):
        engine.add_request(prompts[1], SamplingParams(max_tokens=12, output_kind=kind), kind)
    seen = {"delta": [], "final": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["delta"]) == 12 and len(seen["final"]) == 1
    final, streamed = seen["final"][0], seen["delta"][-1]
    assert final.finished and final.token_ids == final.new_token_ids == streamed.token_ids
    assert final.text == final.new_text == streamed.text
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="sometimes")
