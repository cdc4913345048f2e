"""Async scheduling (EngineConfig.async_scheduling): step n is launched before step n-1's tokens are
read back. On the CPU the same pipelined code runs (the "device" tensor is a CPU tensor), so these
check its bookkeeping: the one-step lag, discarded tokens of finished / aborted sequences, no
decode for a token that can only be discarded, preemption with a token in flight, and equality
with the synchronous engine and the reference (tests/reference.py). (test_engine.py runs its equality tests both ways.)"""

import pytest
import torch
from reference import chat_prompt, reference_generate

from qoq.engine import LLM, SamplingParams
from qoq.engine.sampler import sample_tokens, sample_tokens_device
from qoq.engine.sequence import Sequence, SequenceStatus
from qoq.sampling import draw_one

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a young girl who loved to read books about",
]


@pytest.fixture(scope="module")
def prompts(bundled):
    _, tok = bundled
    return [tok(t)["input_ids"] for t in TEXTS] + [chat_prompt(tok, "What is the capital of France?")]


def make_engine(bundled, async_scheduling, **kw):
    kw = {"kv_bits": 16, "page_size": 16, "num_pages": 32, **kw}  # a small cache is quick to allocate
    return LLM.from_model(*bundled, async_scheduling=async_scheduling, **kw).engine


def record_launches(engine) -> list[list[str]]:
    """The request ids of every step launched (async engines), in row order."""
    launches = []
    launch = engine.runner.launch

    def recording(batch, prev):
        launches.append([s.request_id for s in batch.seqs])
        return launch(batch, prev)

    engine.runner.launch = recording
    return launches


def run(engine, requests) -> list[list[tuple]]:
    """Add (prompt, params, id) requests, step to the end: each step's outputs as plain tuples."""
    for prompt, params, rid in requests:
        engine.add_request(prompt, params, rid)
    steps = []
    while engine.has_unfinished_requests():
        steps.append([(o.request_id, list(o.new_token_ids), o.new_text, o.finished, o.finish_reason)
                      for o in engine.step()])
        assert len(steps) < 200
    return steps


def test_outputs_lag_one_step_and_discarded_tokens_never_show(bundled, prompts):
    """Async step() returns what the synchronous step() returned one call earlier; a sequence that
    stops (EOS, stop string) was already in the next launched step, whose token for it is dropped;
    a sequence that ends on max_tokens is not decoded for a token it could not use."""
    requests = [(prompts[3], SamplingParams(max_tokens=10), "eos"),  # the chat answer ends on EOS
                (prompts[1], SamplingParams(max_tokens=16, stop=["return"]), "stop"),
                (prompts[0], SamplingParams(max_tokens=6), "len")]
    sync_steps = run(make_engine(bundled, False), requests)
    engine = make_engine(bundled, True)
    launches = record_launches(engine)
    async_steps = run(engine, requests)
    # One step later; and when the last sequence to finish stopped on a token, one more step
    # processes (and drops) the token it got in the step launched meanwhile.
    extra = len(async_steps) - 1 - len(sync_steps)
    assert async_steps[0] == [] and async_steps[1:] == sync_steps + [[]] * extra and extra in (0, 1)
    outputs = {rid: [o for step in async_steps for o in step if o[0] == rid] for _, _, rid in requests}
    for rid, outs in outputs.items():
        assert [o[3] for o in outs] == [False] * (len(outs) - 1) + [True]  # nothing after finishing
        num_tokens = sum(len(o[1]) for o in outs)
        launched = sum(rid in ids for ids in launches)
        if rid == "len":
            assert outs[-1][4] == "length" and launched == num_tokens == 6  # no wasted decode
        else:  # the stop token / string step, plus one launched step whose token was dropped
            assert outs[-1][4] == "stop" and launched == len(outs) + 1
    assert engine.block_manager.num_used_pages == 0 and not engine.scheduler.running


def test_max_tokens_one_and_mixed_lengths(bundled, prompts):
    """max_tokens 1 is the prefill's token alone: no decode step for it at all."""
    model, tok = bundled
    lengths = (1, 2, 5, 1)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    reference = [reference_generate(model, tok, p, sp) for p, sp in zip(prompts, params)]
    requests = [(p, sp, str(i)) for i, (p, sp) in enumerate(zip(prompts, params))]
    for async_scheduling in (True, False):
        engine = make_engine(bundled, async_scheduling)
        launches = record_launches(engine) if async_scheduling else None
        outputs = [o for step in run(engine, requests) for o in step]
        for i, ref in enumerate(reference):
            mine = [o for o in outputs if o[0] == str(i)]
            assert [t for o in mine for t in o[1]] == ref.token_ids
            assert "".join(o[2] for o in mine) == ref.text
            assert mine[-1][3:] == (True, "length")
        assert not engine.requests and engine.block_manager.num_used_pages == 0
        if launches is not None:
            assert [sum(str(i) in ids for ids in launches) for i in range(len(prompts))] == list(lengths)


def test_abort_while_a_token_is_in_flight(bundled, prompts):
    model, tok = bundled
    engine = make_engine(bundled, True)
    engine.add_request(prompts[2], SamplingParams(max_tokens=8), "x")
    engine.add_request(prompts[0], SamplingParams(max_tokens=8), "y")
    assert engine.step() == []  # the prefill step is launched, nothing processed yet
    first = engine.step()  # prefill processed (1 token each), first decode in flight
    x = engine.requests["x"]
    assert x.num_pending == 1 and x.output_token_ids and x.status == SequenceStatus.RUNNING
    known, x_pages = list(x.output_token_ids), len(x.block_table)
    used = engine.block_manager.num_used_pages
    out = engine.abort_request("x")
    assert out.finished and out.finish_reason == "abort" and out.token_ids == known
    assert engine.block_manager.num_used_pages == used - x_pages  # freed at once
    rest = run(engine, [])
    assert all(o[0] != "x" for step in rest for o in step)
    assert x.output_token_ids == known  # its in-flight token was dropped
    ref = reference_generate(model, tok, prompts[0], SamplingParams(max_tokens=8))
    y_tokens = [t for o in first if o.request_id == "y" for t in o.new_token_ids]
    y_tokens += [t for step in rest for o in step if o[0] == "y" for t in o[1]]
    assert y_tokens == ref.token_ids and "y" not in engine.requests
    assert engine.block_manager.num_used_pages == 0 and not engine.has_unfinished_requests()


def test_preempted_with_its_last_token_in_flight_finishes_while_waiting(bundled, prompts):
    """3 pages of 8 tokens. a (15 prompt tokens, 2 pages) and b (7, 1 page) prefill together and
    decode once together; then a's pending token needs a third page. Async: b, whose second and
    last token is still in flight, is preempted, and finishes from WAITING when that token is
    read; synchronous: b has already finished. Same batches for a either way: same tokens."""
    a_prompt, b_prompt = prompts[2][:15], prompts[1][:7]
    requests = [(a_prompt, SamplingParams(max_tokens=6, ignore_eos=True), "a"),
                (b_prompt, SamplingParams(max_tokens=2, ignore_eos=True), "b")]
    results = {}
    for async_scheduling in (True, False):
        engine = make_engine(bundled, async_scheduling, page_size=8, num_pages=3)
        steps = run(engine, requests)
        results[async_scheduling] = [o for step in steps for o in step]
        assert engine.scheduler.num_preemptions == (1 if async_scheduling else 0)
        assert engine.block_manager.num_free_pages == 3 and not engine.scheduler.waiting
    assert results[True] == results[False]
    final = {o[0]: o for o in results[True] if o[3]}
    assert final["b"][4] == "length" and final["a"][4] == "length"


def test_device_sampler_equals_the_synchronous_one():
    """sample_tokens_device draws exactly what sample_tokens (and torch.multinomial) draws."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen) * 2
    params = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=20, seed=3),
              SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(), SamplingParams(temperature=0.5, seed=9)]

    def seqs():
        out = [Sequence(str(i), [1], p) for i, p in enumerate(params)]
        for s in out:
            if s.params.seed is not None:
                s.generator = torch.Generator().manual_seed(s.params.seed)
        return out

    for _ in range(5):
        state = gen.get_state()
        a = sample_tokens(logits, seqs(), gen)
        gen.set_state(state)
        b = sample_tokens_device(logits, seqs(), gen)
        assert b.dtype == torch.long and b.tolist() == a
        logits = logits.roll(1, dims=-1)


def test_draw_one_is_torch_multinomial():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(4, 500, generator=g) * 3
        logits[1, :400] = float("-inf")  # filtered rows: zero probabilities
        probs = logits.softmax(-1)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            assert torch.equal(torch.multinomial(probs, 1, generator=g1).squeeze(-1), draw_one(probs, g2))


def test_a_failed_read_back_drops_the_in_flight_tokens_and_decoding_resumes(bundled, prompts):
    """If reading a step's tokens fails, both in-flight steps' tokens are forgotten and the step is
    isolated (test_isolation.py): the sequences are recomputed, alone, then together again, losing
    nothing; step() itself does not raise."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = make_engine(bundled, True)
    launch, launches = engine.runner.launch, [0]

    def failing_launch(batch, prev):
        step = launch(batch, prev)
        launches[0] += 1
        if launches[0] == 3:
            def fail():
                raise RuntimeError("read-back error")
            step.token_ids = fail
        return step

    engine.runner.launch = failing_launch
    for i in (0, 2):
        engine.add_request(prompts[i], params, str(i))
    tokens = {"0": [], "2": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    assert engine.stats().num_failed_steps_total == 1 and engine.block_manager.num_used_pages == 0
    clean = [o for step in run(make_engine(bundled, True), [(prompts[i], params, str(i)) for i in (0, 2)])
             for o in step]
    assert tokens == {rid: [t for o in clean if o[0] == rid for t in o[1]] for rid in ("0", "2")}
