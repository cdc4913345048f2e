"""Structured output (engine/guided.py): masks against a plain torch reference and llguidance's own
byte mask; generation under a JSON schema that always parses and validates (greedy and sampled,
async scheduling on and off); a guided sequence never decoded with its last token in flight;
preemption by recompute, aborts and max_tokens with the matcher's state right."""

import json
import re

import jsonschema
import pytest
import torch

from qoq.engine import LLM, SamplingParams
from qoq.engine.guided import GrammarError, apply_bitmask, build_grammar, fill_bitmask
from qoq.generate import apply_chat_template

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_prompt(bundled):
    return apply_chat_template(bundled[1], "Describe a person as JSON with a name, an age and tags.")


def make_llm(bundled, async_scheduling=True, **kw):
    kw = {"kv_bits": 16, "page_size": 16, "num_pages": 64, **kw}
    return LLM.from_model(*bundled, async_scheduling=async_scheduling, **kw)


def reference_mask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        for t in range(logits.shape[1]):
            word = t // 32
            if word >= bitmask.shape[1] or not (int(bitmask[i, word]) >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [64, 100, 131])  # whole words, a part word, wider than the mask
def test_apply_bitmask_equals_a_plain_reference(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    rows = [0, 3, 4]
    words = min((vocab + 31) // 32, 4)  # vocab 131: the mask covers 128 tokens, the rest is forbidden
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=g)
    expected = reference_mask(logits, rows, bitmask)
    apply_bitmask(logits, torch.tensor(rows), bitmask)
    assert torch.equal(logits, expected)


def test_matcher_bitmask_equals_its_byte_mask_and_eos_only_when_accepting(bundled):
    engine = make_llm(bundled).engine
    guidance = engine.guidance()
    vocab = engine.model.config.vocab_size
    matcher = guidance.new_matcher(build_grammar("regex", "[0-9]{2,3}"))
    tok = bundled[1]
    eos = tok.eos_token_id
    for step in range(4):
        bits = fill_bitmask([matcher], vocab, pin=False)
        allowed = ((bits[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:vocab]
        byte_mask = torch.frombuffer(bytearray(matcher.deep_copy().compute_logit_bias()), dtype=torch.uint8)[:vocab]
        assert torch.equal(allowed, byte_mask > 0)
        assert bool(allowed[eos]) == (step >= 2)  # two digits at least
        if step == 3:
            assert allowed.sum() == 1  # three digits: only EOS left
            break
        digit = tok.convert_tokens_to_ids("7")
        assert allowed[digit] and matcher.consume_token(digit)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_json_schema_output_parses_and_validates(bundled, chat_prompt, async_scheduling):
    llm = make_llm(bundled, async_scheduling)
    grammar = build_grammar("json_schema", PERSON)
    params = [SamplingParams(max_tokens=40, grammar=grammar),
              SamplingParams(max_tokens=40, temperature=1.0, seed=1, grammar=grammar),
              SamplingParams(max_tokens=40, temperature=0.7, top_k=50, top_p=0.9,
                             grammar=build_grammar("json_schema", {"type": "object"})),
              SamplingParams(max_tokens=8)]  # unguided, beside them
    outs = llm.generate([chat_prompt] * 3 + ["The capital of France is"], params)
    for out, p in zip(outs[:3], params):
        if out.finish_reason == "length" and p.temperature:  # a sampled row may ramble on (in JSON)
            assert len(out.token_ids) == p.max_tokens
            continue
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        jsonschema.validate(value, PERSON if p is not params[2] else {"type": "object"})
    alone = llm.generate(["The capital of France is"], params[3])
    assert outs[3].token_ids == alone[0].token_ids  # unguided rows untouched


def test_regex_and_lark_grammars_and_max_tokens(bundled, chat_prompt):
    llm = make_llm(bundled)
    outs = llm.generate([chat_prompt] * 3, [
        SamplingParams(max_tokens=16, grammar=build_grammar("regex", r"(yes|no), [0-9]{3}")),
        SamplingParams(max_tokens=16, grammar=build_grammar("lark", 'start: "color: " COLOR\nCOLOR: "red" | "green"')),
        SamplingParams(max_tokens=5, grammar=build_grammar("json_schema", PERSON))])
    assert re.fullmatch(r"(yes|no), [0-9]{3}", outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("color: red", "color: green") and outs[1].finish_reason == "stop"
    assert outs[2].finish_reason == "length" and len(outs[2].token_ids) == 5 and outs[2].text.startswith("{")


def test_bad_grammars_are_refused(bundled):
    engine = make_llm(bundled).engine
    with pytest.raises(GrammarError, match="objekt"):
        engine.add_request("x", SamplingParams(grammar=build_grammar("json_schema", {"type": "objekt"})))
    with pytest.raises(GrammarError, match="regex"):
        engine.guidance().check(build_grammar("regex", "a(b"))
    with pytest.raises(GrammarError):
        build_grammar("json_schema", "{not json")
    assert not engine.requests


def test_async_guided_sequence_never_decodes_with_its_token_in_flight(bundled, chat_prompt):
    """Async: every other step() for the guided sequence (its mask needs the token in flight), every
    step for the unguided one (alone, the guided one's steps alternate with empty ones); the
    outputs equal the synchronous engine's."""
    grammar = build_grammar("json_schema", PERSON)
    requests = [(chat_prompt, SamplingParams(max_tokens=40, grammar=grammar), "guided"),
                (chat_prompt, SamplingParams(max_tokens=40, ignore_eos=True), "plain")]
    engine = make_llm(bundled, True).engine
    launches = []  # (step() call, request ids launched)
    launch = engine.runner.launch

    def recording(batch, prev):
        for seq in batch.seqs:
            assert seq.num_pending == 0 or seq.guide is None
        launches.append((len(calls), [s.request_id for s in batch.seqs]))
        return launch(batch, prev)

    engine.runner.launch = recording
    outs, calls = {}, []
    for prompt, params, rid in requests:
        engine.add_request(prompt, params, rid)
    while engine.has_unfinished_requests():
        calls.append(None)
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    guided_calls = [call for call, ids in launches if "guided" in ids]
    plain_calls = [call for call, ids in launches if "plain" in ids]
    assert all(b - a == 2 for a, b in zip(guided_calls, guided_calls[1:]))
    assert plain_calls == list(range(1, len(plain_calls) + 1))  # every step() call
    assert len(plain_calls) > len([c for c in guided_calls if c <= plain_calls[-1]]) + 5

    sync = make_llm(bundled, False).engine
    for prompt, params, rid in requests:
        sync.add_request(prompt, params, rid)
    sync_outs = {}
    while sync.has_unfinished_requests():
        for out in sync.step():
            sync_outs.setdefault(out.request_id, []).append(out)
    for rid in ("guided", "plain"):
        assert outs[rid][-1].token_ids == sync_outs[rid][-1].token_ids
        assert "".join(o.new_text for o in outs[rid]) == outs[rid][-1].text
    jsonschema.validate(json.loads(outs["guided"][-1].text), PERSON)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_preemption_and_abort_keep_the_matcher_right(bundled, chat_prompt, async_scheduling):
    """A tiny page pool preempts guided sequences (recompute re-prefills their tokens without feeding
    the matcher again): each output still validates and equals an unpreempted run; an aborted
    guided request leaves the others alone."""
    grammar = build_grammar("json_schema", PERSON)
    params = [SamplingParams(max_tokens=40, grammar=grammar),
              SamplingParams(max_tokens=40, temperature=0.8, seed=5, grammar=grammar)]
    big = make_llm(bundled, async_scheduling).generate([chat_prompt] * 2, params)
    # ~60 tokens each: 8 pages of 8 tokens; 12 pages hold one
    llm = make_llm(bundled, async_scheduling, page_size=8, num_pages=12, max_num_seqs=2)
    small = llm.generate([chat_prompt] * 2, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for a, b in zip(big, small):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "stop"
        jsonschema.validate(json.loads(b.text), PERSON)

    engine = make_llm(bundled, async_scheduling).engine
    for i, p in enumerate(params):
        engine.add_request(chat_prompt, p, f"r{i}")
    for _ in range(4):
        engine.step()
    engine.abort_request("r0")
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert list(final) == ["r1"] and final["r1"].token_ids == big[1].token_ids
