"""The request features of the OpenAI API on a GPU (bundled model, fp16): penalties, logit_bias,
min_tokens, logprobs, prompt logprobs and structured output. CUDA graphs give the eager engine's
tokens, logprobs are the dense forward's log-softmax, guided JSON parses and has the schema's
fields, and launching a step with penalties, biases and logprobs never waits on the GPU."""

import json

import pytest
import torch

from qoq.engine import LLM, SamplingParams
from qoq.engine.guided import build_grammar
from qoq.generate import apply_chat_template
from qoq.model.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ENGINE = dict(kv_bits=16, page_size=16, max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.3)
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gpu_bundled():
    return load_model(dtype=torch.float16, device="cuda")


def _requests(tok):
    eos = tok.eos_token_id
    chat = apply_chat_template(tok, "Describe a person as JSON with a name and an age.")
    prompt = tok(PROMPT)["input_ids"]
    return [
        (prompt, SamplingParams(max_tokens=16, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4,
                                logprobs=3, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=16, temperature=0.9, seed=4, frequency_penalty=1.0, logprobs=2,
                                ignore_eos=True)),
        (tok("Hello")["input_ids"], SamplingParams(max_tokens=8, logit_bias={eos: 100.0}, min_tokens=3)),
        (prompt, SamplingParams(max_tokens=6, prompt_logprobs=2, logprobs=0, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=12, ignore_eos=True)),
        (chat, SamplingParams(max_tokens=40, grammar=build_grammar("json_schema", PERSON))),
    ]


def test_graphs_equal_eager_and_the_values_are_the_models(gpu_bundled):
    model, tok = gpu_bundled
    requests = _requests(tok)
    prompts, params = [r[0] for r in requests], [r[1] for r in requests]
    outs = {}
    for eager in (False, True):
        llm = LLM.from_model(model, tok, enforce_eager=eager, **ENGINE)
        assert (llm.engine.runner.graphs is None) == eager
        outs[eager] = llm.generate(prompts, params)
        del llm
    assert [o.token_ids for o in outs[False]] == [o.token_ids for o in outs[True]]
    penalized, sampled, held, prompt_lp, plain, guided = outs[False]

    assert penalized.token_ids != plain.token_ids  # the penalties changed the greedy choice
    prompt = prompts[0]
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor([prompt + penalized.token_ids], device="cuda"))[0]).float()
    ref = torch.log_softmax(logits, -1).cpu()
    for i, (token, entry) in enumerate(zip(penalized.token_ids, penalized.new_logprobs, strict=True)):
        row = len(prompt) + i - 1
        assert entry[0] == token and abs(entry[1] - ref[row, token].item()) < 0.05, i
        assert len(entry[2]) == 3 and abs(entry[2][0][1] - ref[row].max().item()) < 0.05, i
    assert len(sampled.new_logprobs) == 16 and all(len(e[2]) == 2 for e in sampled.new_logprobs)

    eos = tok.eos_token_id
    assert len(held.token_ids) == 3 and held.finish_reason == "stop" and eos not in held.token_ids

    assert prompt_lp.prompt_logprobs[0] is None and len(prompt_lp.prompt_logprobs) == len(prompt)
    with torch.inference_mode():
        dense = torch.log_softmax(model.compute_logits(model(torch.tensor([prompt], device="cuda"))[0]).float(), -1)
    for pos in range(1, len(prompt)):
        token, logprob, _ = prompt_lp.prompt_logprobs[pos]
        assert token == prompt[pos] and abs(logprob - dense[pos - 1, token].item()) < 0.05, pos

    assert guided.finish_reason == "stop", guided.text
    value = json.loads(guided.text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


def test_launching_with_penalties_biases_and_logprobs_never_waits(gpu_bundled):
    model, tok = gpu_bundled
    llm = LLM.from_model(model, tok, async_scheduling=True, **ENGINE)
    engine = llm.engine
    requests = [r for r in _requests(tok) if r[1].grammar is None]
    llm.generate([r[0] for r in requests[:2]], [r[1] for r in requests[:2]])  # warm-up
    launches = [0]
    launch = engine.runner.launch

    def checked_launch(batch, prev):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch, prev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            launches[0] += 1

    engine.runner.launch = checked_launch
    outs = llm.generate([r[0] for r in requests], [r[1] for r in requests])
    assert launches[0] >= 12
    assert [len(o.token_ids) for o in outs] == [16, 16, 3, 6, 12]
