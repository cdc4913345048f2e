"""One bad request never fails the others: a step that raises is isolated (its requests run
alone; the one whose step still fails finishes with "error"), a token that cannot be recorded
fails only its request, and a device fault stops the engine instead of being blamed on anyone."""

import pytest
from faults import POISON, poison_forward
from reference import reference_generate

from qoq.engine import LLM, SamplingParams
from qoq.server.engine_loop import EngineLoop

TEXTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "1, 2, 3, 4,",
         "Once upon a time", "The quick brown fox", "import numpy as", "Dear Sir or Madam,"]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(bundled):
    return [bundled[1](t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def reference(bundled, prompts):
    model, tok = bundled
    return [reference_generate(model, tok, p, PARAMS).token_ids for p in prompts]


def make_engine(bundled, async_scheduling=True, **kw):
    return LLM.from_model(*bundled, kv_bits=16, page_size=16, num_pages=64, async_scheduling=async_scheduling,
                          **kw).engine


def run_all(engine, requests):
    """Add (request_id, prompt, params), step to the end: {request_id: final output}."""
    for rid, prompt, params in requests:
        engine.add_request(prompt, params, rid)
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
        assert len(final) <= len(requests)
    return final


def assert_others_exact(final, reference, bad: str):
    for i, ref in enumerate(reference):
        if str(i) != bad:
            assert final[str(i)].finish_reason == "length" and final[str(i)].token_ids == ref, i


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_forward_that_fails_for_one_request_fails_only_it(bundled, prompts, reference, monkeypatch,
                                                            async_scheduling):
    engine = make_engine(bundled, async_scheduling)
    poison_forward(monkeypatch, engine.model)
    requests = [(str(i), p + [POISON] if i == 3 else p, PARAMS) for i, p in enumerate(prompts)]
    final = run_all(engine, requests)
    bad = final["3"]
    assert bad.finish_reason == "error" and "ValueError: poisoned token" in bad.error
    assert_others_exact(final, reference, "3")
    stats = engine.stats()
    assert stats.finished_total == {"error": 1, "length": 7} and stats.num_failed_steps_total == 1
    assert engine.block_manager.num_used_pages == 0


def test_sampling_that_fails_mid_generation_fails_only_its_request(bundled, prompts, reference, monkeypatch):
    """A request that breaks sampling on its 4th token, while all 8 decode together."""
    import qoq.engine.model_runner as runner_module

    sample = runner_module.sample_tokens_device

    def failing(logits, seqs, generator):
        if any(s.request_id == "5" and len(s.output_token_ids) >= 3 for s in seqs):
            raise RuntimeError("a sampling kernel refused row 5")
        return sample(logits, seqs, generator)

    monkeypatch.setattr(runner_module, "sample_tokens_device", failing)
    engine = make_engine(bundled)
    final = run_all(engine, [(str(i), p, PARAMS) for i, p in enumerate(prompts)])
    assert final["5"].finish_reason == "error" and "row 5" in final["5"].error
    assert final["5"].token_ids == reference[5][: len(final["5"].token_ids)]
    assert_others_exact(final, reference, "5")


def test_a_token_that_cannot_be_detokenized_fails_only_its_request(bundled, prompts, reference):
    token = next(t for t in reference[2] if all(t not in r for i, r in enumerate(reference) if i != 2))

    class Tokenizer:  # the real one, except that it cannot decode `token`
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def decode(self, ids, **kwargs):
            if token in ids:
                raise OverflowError("out of range integral type conversion attempted")
            return self.tok.decode(ids, **kwargs)

    model, tok = bundled
    engine = make_engine((model, Tokenizer(tok)))
    final = run_all(engine, [(str(i), p, PARAMS) for i, p in enumerate(prompts)])
    assert final["2"].finish_reason == "error" and "OverflowError" in final["2"].error
    assert_others_exact(final, reference, "2")
    assert engine.stats().num_failed_steps_total == 0  # no step failed: only the row


def test_requests_that_arrive_and_abort_during_isolation(bundled, prompts, reference, monkeypatch):
    engine = make_engine(bundled)
    poison_forward(monkeypatch, engine.model)
    for i in range(4):
        engine.add_request(prompts[i] + [POISON] if i == 0 else prompts[i], PARAMS, str(i))
    final = {}
    engine.step()  # launches the poisoned step: it fails when processed...
    engine.step()
    assert engine._suspects  # ...and the requests now run alone
    engine.add_request(prompts[4], PARAMS, "4")
    assert engine.abort_request("2").finish_reason == "abort"
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert final["0"].finish_reason == "error" and "2" not in final
    for i in (1, 3, 4):
        assert final[str(i)].token_ids == reference[i]
    assert engine.block_manager.num_used_pages == 0


def test_a_device_fault_is_raised_not_isolated(bundled, prompts, monkeypatch):
    engine = make_engine(bundled)
    poison_forward(monkeypatch, engine.model, RuntimeError("CUDA error: an illegal memory access was encountered"))
    engine.add_request(prompts[0] + [POISON], PARAMS, "0")
    engine.add_request(prompts[1], PARAMS, "1")
    with pytest.raises(RuntimeError, match="CUDA error"):
        for _ in range(3):
            engine.step()


def test_the_engine_loop_fails_every_request_and_stops_on_a_device_fault(bundled, prompts, monkeypatch):
    engine = make_engine(bundled)
    poison_forward(monkeypatch, engine.model, RuntimeError("CUDA error: an illegal memory access was encountered"))
    commands = [("add", "0", prompts[0], PARAMS), ("add", "1", prompts[1] + [POISON], PARAMS)]
    messages = []
    failed = EngineLoop(engine, lambda block: commands.pop(0) if commands else None, messages.append).run()
    assert failed
    finals = {d.request_id: d for m in messages for d in m.deltas if d.finished}
    assert set(finals) == {"0", "1"}
    assert all(d.finish_reason == "error" and "CUDA error" in d.error for d in finals.values())
    assert messages[-1].stats.finished_total == {"error": 2}
