"""Penalties, min_tokens, logit_bias, logprobs and prompt logprobs in the engine, against plain
references: the dense no-cache forward of the bundled model (fp32) and per-element Python loops."""

import math

import pytest
import torch

from qoq.engine import LLM
from qoq.engine.logprobs import logprobs_of
from qoq.engine.sampler import process_logits
from qoq.engine.sequence import Sequence
from qoq.sampling import SamplingParamError, SamplingParams, apply_penalties, validate_choices

ENGINE = dict(kv_bits=16, page_size=16, num_pages=64, max_model_len=256, max_num_seqs=8)
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and"


def penalize_ref(logits, prompt, output, presence, frequency, repetition):
    """One row, element by element (HF repetition penalty, then OpenAI's penalties)."""
    out = logits.clone()
    for t in range(len(out)):
        count = output.count(t)
        if t in prompt or count:
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        out[t] -= frequency * count + presence * (count > 0)
    return out


@pytest.mark.parametrize("kwargs, param", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=2.5), "repetition_penalty"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(logit_bias={1: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={"1": 1.0}), "logit_bias"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=True), "prompt_logprobs"),
])
def test_bad_values_name_their_field(kwargs, param):
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_choices_validation():
    validate_choices(3, 5, stream=False)
    for n, best_of, stream, param in [(0, None, False, "n"), (2, 1, False, "best_of"), (2, 3, True, "best_of"),
                                      (129, None, False, "n")]:
        with pytest.raises(SamplingParamError) as err:
            validate_choices(n, best_of, stream)
        assert err.value.param == param


def test_apply_penalties_equals_the_loop():
    gen = torch.Generator().manual_seed(0)
    vocab = 12
    logits = torch.randn(3, vocab, generator=gen) * 3
    rows = [([1, 2], [3, 3, 4, 1], 0.5, 0.3, 1.3), ([], [5], -1.0, 2.0, 1.0), ([7, 0], [], 0.0, 0.0, 0.7)]
    counts = torch.zeros(3, vocab, dtype=torch.int32)
    prompt_mask = torch.zeros(3, vocab, dtype=torch.bool)
    for r, (prompt, output, *_) in enumerate(rows):
        prompt_mask[r, prompt] = True
        for t in output:
            counts[r, t] += 1
    got = apply_penalties(logits.clone(), counts, prompt_mask, *(torch.tensor([row[i] for row in rows])
                                                                   for i in (2, 3, 4)))
    for r, (prompt, output, p, f, rep) in enumerate(rows):
        torch.testing.assert_close(got[r], penalize_ref(logits[r], prompt, output, p, f, rep))


def test_process_logits_counts_the_pending_token_and_masks_stops_until_min_tokens():
    vocab = 10
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    plain = Sequence("plain", [1, 2], SamplingParams())
    pen = Sequence("pen", [1, 2], SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.5,
                                                 logit_bias={9: 3.0}))
    pen.output_token_ids = [4, 4]
    pen.num_pending = 1  # its last token (6) is still on the device: this step's input id
    short = Sequence("short", [3], SamplingParams(min_tokens=2, max_tokens=5), stop_token_ids=frozenset({0, 8}))
    short.output_token_ids = [5]
    last_ids = torch.tensor([2, 6, 5])
    got = logits.clone()
    process_logits(got, [plain, pen, short], last_ids)
    assert torch.equal(got[0], logits[0])  # a row without parameters is untouched
    expected = penalize_ref(logits[1], [1, 2], [4, 4, 6], 1.0, 0.5, 1.5)
    expected[9] += 3.0
    torch.testing.assert_close(got[1], expected)
    assert got[2, 0] == -math.inf and got[2, 8] == -math.inf
    short.output_token_ids = [5, 7]  # min_tokens reached: stops allowed again
    again = logits[2:].clone()
    process_logits(again, [short], last_ids[2:])
    assert torch.equal(again[0], logits[2])


def test_logprobs_of_is_log_softmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([3, 0, 29, 7])
    values = logprobs_of(logits, tokens, 3)
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(values[:, 0].double(), ref.gather(-1, tokens[:, None])[:, 0])
    top = ref.topk(3, -1)
    torch.testing.assert_close(values[:, 1:4].double(), top.values)
    assert torch.equal(values[:, 4:].long(), top.indices)


# -- the engine on the bundled model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(bundled):
    model, tok = bundled
    return LLM.from_model(model, tok, **ENGINE)


def dense_logits(model, ids: list[int]) -> torch.Tensor:
    """The dense no-cache forward's logits at every position: [len(ids), V] float64."""
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor([ids]))[0]).double()


def dense_logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(dense_logits(model, ids), -1)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_penalized_greedy_follows_the_reference_and_logprobs_are_the_raw_ones(bundled, llm, async_scheduling):
    model, tok = bundled
    llm.engine.config.async_scheduling = async_scheduling
    prompt = tok(PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=12, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4,
                            logprobs=3, ignore_eos=True)
    plain_params = SamplingParams(max_tokens=12, ignore_eos=True)
    out, plain = llm.generate([prompt, prompt], [params, plain_params])
    assert out.token_ids != plain.token_ids  # the penalties changed the choice
    assert plain.new_logprobs is None and plain.cumulative_logprob is None
    logits = dense_logits(model, prompt + out.token_ids)
    ref = torch.log_softmax(logits, -1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.new_logprobs, strict=True)):
        row = len(prompt) + i - 1
        expected = penalize_ref(logits[row], prompt, out.token_ids[:i], 0.8, 0.6, 1.4)
        assert token == int(expected.argmax()), i
        assert entry[0] == token and abs(entry[1] - ref[row, token].item()) < 1e-3
        top = ref[row].topk(3)
        assert [t for t, _ in entry[2]] == top.indices.tolist()
        assert max(abs(lp - v) for (_, lp), v in zip(entry[2], top.values.tolist())) < 1e-3
    assert abs(out.cumulative_logprob - sum(e[1] for e in out.new_logprobs)) < 1e-6


def test_prompt_logprobs_over_chunks_and_a_cached_prefix(bundled):
    model, tok = bundled
    llm = LLM.from_model(model, tok, **{**ENGINE, "max_num_batched_tokens": 7})  # chunks of <= 7 tokens
    prompt = tok(PROMPT)["input_ids"]
    llm.generate([prompt], SamplingParams(max_tokens=1))  # its full pages are now cached
    hits = llm.engine.block_manager.num_hit_tokens
    [out] = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=2, logprobs=0))
    assert llm.engine.block_manager.num_hit_tokens == hits  # it recomputed its cached prefix
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    ref = dense_logprobs(model, prompt)
    for pos in range(1, len(prompt)):
        token, logprob, top = out.prompt_logprobs[pos]
        assert token == prompt[pos] and abs(logprob - ref[pos - 1, token].item()) < 1e-3, pos
        assert [t for t, _ in top] == ref[pos - 1].topk(2).indices.tolist()
    assert [len(e[2]) for e in out.new_logprobs] == [0, 0]  # logprobs=0: the chosen token's only


def test_min_tokens_holds_off_eos_and_logit_bias_forces_a_token(llm, bundled):
    _, tok = bundled
    eos = tok.eos_token_id
    prompt = tok("Hello")["input_ids"]
    eager, held = llm.generate([prompt, prompt], [SamplingParams(max_tokens=8, logit_bias={eos: 100.0}),
                                                  SamplingParams(max_tokens=8, logit_bias={eos: 100.0}, min_tokens=3)])
    assert eager.token_ids == [] and eager.finish_reason == "stop"
    assert len(held.token_ids) == 3 and held.finish_reason == "stop" and eos not in held.token_ids
    forced = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=1.0, seed=0, logit_bias={1234: 100.0}))
    assert forced[0].token_ids == [1234] * 5


def test_siblings_share_their_prompts_pages(llm, bundled):
    """Choices of one prompt (the server's n) admitted together start past the first one's pages."""
    _, tok = bundled
    engine = llm.engine
    prompt = tok(PROMPT + " " + PROMPT + " once more")["input_ids"]
    full_pages = (len(prompt) - 1) // ENGINE["page_size"]
    assert full_pages >= 2
    engine.block_manager.forget_cached_pages()  # earlier tests' requests cached this prompt's first page
    hits = engine.block_manager.num_hit_tokens
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=s)) for s in (1, 2, 3)]
    engine.step()
    tables = [engine.requests[i].block_table[:full_pages] for i in ids]
    assert tables[0] == tables[1] == tables[2]
    assert engine.block_manager.num_hit_tokens - hits == 2 * full_pages * ENGINE["page_size"]
    while engine.has_unfinished_requests():
        engine.step()
