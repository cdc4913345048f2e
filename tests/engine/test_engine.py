"""The engine against the dense reference generator, on the bundled model (fp32, CPU)."""

import pytest
import torch
from engine_reference import forced_logits

from qoq.engine import LLM, SamplingParams
from qoq.generate import apply_chat_template, generate

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
    """qoq.generate one prompt at a time (no padding): the outputs the engine must reproduce."""
    model, tok = bundled
    return [generate(model, tok, [p], SamplingParams(max_tokens=MAX_TOKENS))[0] for p in prompts]


def assert_same(outputs, reference):
    for out, ref in zip(outputs, reference, strict=True):
        assert out.token_ids == ref.token_ids
        assert out.text == ref.text
        assert out.finish_reason == ref.finish_reason


def test_fp_cache_matches_reference_generator(bundled, prompts, reference):
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=16)
    assert_same(llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS)), reference)
    assert {r.finish_reason for r in reference} == {"length", "stop"}


def test_token_ids_only_without_detokenization(bundled, prompts, reference):
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=16)
    outs = llm.generate(prompts[:3], SamplingParams(max_tokens=MAX_TOKENS, detokenize=False))
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference[:3]]
    assert all(o.text == "" for o in outs)


@pytest.mark.parametrize("bits, min_agreement", [(8, 0.95), (4, 0.75)])
def test_quantized_cache_agrees_with_dense_reference(bundled, prompts, bits, min_agreement):
    """KV8/KV4: rounding of 8/4-bit codes amplifies last-bit differences between two correct
    implementations, so instead of equal sequences we check that each engine token is the
    reference's own choice (top-1) given the same history, on almost every step."""
    model, tok = bundled
    llm = LLM.from_model(model, tok, kv_bits=bits, page_size=16)
    outputs = llm.generate(prompts[:4], SamplingParams(max_tokens=12, ignore_eos=True))
    hits = total = 0
    for prompt, out in zip(prompts, outputs):
        logits = forced_logits(model, prompt, out.token_ids, bits)
        chosen = torch.tensor(out.token_ids)
        hits += int((logits.argmax(-1) == chosen).sum())
        total += len(chosen)
        # Where they differ, the engine's token is still among the reference's top 5.
        assert (logits.topk(5).indices == chosen[:, None]).any(-1).all()
    assert hits / total >= min_agreement, f"KV{bits}: top-1 agreement {hits}/{total}"


def test_preemption_under_a_tiny_pool_loses_nothing(bundled, prompts, reference):
    # 8 pages of 8 tokens hold ~2 of these sequences at once: most steps preempt someone.
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=8, num_pages=8, max_num_seqs=8)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(outputs, reference)
    assert llm.engine.block_manager.num_free_pages == 8


def test_requests_join_the_running_batch(bundled, prompts, reference):
    llm = LLM.from_model(*bundled, kv_bits=16, page_size=16)
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


def test_seeded_sampling_matches_reference(bundled, prompts):
    model, tok = bundled
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=1234)
    [ref] = generate(model, tok, [prompts[0]], params)
    llm = LLM.from_model(model, tok, kv_bits=16, page_size=16)
    a, b = llm.generate([prompts[0], prompts[0]], params)
    assert a.token_ids == b.token_ids == ref.token_ids


def test_streamed_deltas_add_up_and_hold_back_stop_strings(bundled, prompts):
    model, tok = bundled
    params = SamplingParams(max_tokens=16, stop=["return"])
    [ref] = generate(model, tok, [prompts[1]], params)
    engine = LLM.from_model(model, tok, kv_bits=16, page_size=16).engine
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


def test_abort_frees_pages_and_bad_requests_are_refused(bundled, prompts):
    llm = LLM.from_model(*bundled, kv_bits=4, page_size=16, num_pages=4)
    engine = llm.engine
    engine.add_request(prompts[2], SamplingParams(max_tokens=8), "x")
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    out = engine.abort_request("x")
    assert out.finished and out.finish_reason == "abort"
    assert engine.block_manager.num_used_pages == 0 and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request(prompts[0], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="whole cache holds 64"):
        engine.add_request(prompts[0], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request([model_vocab(engine)], SamplingParams())
