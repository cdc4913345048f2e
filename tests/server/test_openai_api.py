"""The server as a client sees it: the `openai` package against a real `qoq serve` process."""

import asyncio

import pytest
from reference import chat_prompt, reference_generate
from server_helpers import MODEL, metric

from qoq.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "1, 2, 3, 4,",
           "Once upon a time, in a land far away, there lived", "The quick brown fox"]


@pytest.fixture(scope="module")
def reference(bundled):
    model, tok = bundled
    return {p: reference_generate(model, tok, tok(p)["input_ids"], SamplingParams(max_tokens=8)) for p in PROMPTS}


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_reference_with_usage(client, bundled, reference):
    prompt = PROMPTS[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == reference[prompt].text
    assert out.choices[0].finish_reason == "length"
    n_prompt = len(bundled[1](prompt)["input_ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)


def test_streamed_completion_equals_non_streamed(client, reference):
    prompt = PROMPTS[1]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference[prompt].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_streaming_and_not(client, bundled):
    model, tok = bundled
    question = "What is the capital of France?"
    ref = reference_generate(model, tok, chat_prompt(tok, question), SamplingParams(max_tokens=20))
    messages = [{"role": "user", "content": question}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.content == ref.text and "Paris" in ref.text
    assert out.choices[0].finish_reason == ref.finish_reason == "stop"
    assert out.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_each_get_their_own_answer(server_url, reference):
    from openai import AsyncOpenAI

    async def run_all():
        client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", timeout=120)
        calls = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=i % 2 == 1)
                 for i, p in enumerate(PROMPTS)]
        results = await asyncio.gather(*calls)
        texts = []
        for r in results:
            if hasattr(r, "choices"):
                texts.append(r.choices[0].text)
            else:
                texts.append("".join([c.choices[0].text async for c in r]))
        await client.close()
        return texts

    assert asyncio.run(run_all()) == [reference[p].text for p in PROMPTS]
    assert metric(server_url, "qoq_kv_cache_pages_used") == 0
    assert metric(server_url, "qoq_generation_tokens_total") > 0


@pytest.mark.parametrize("stop", [[" "], ["Paris. It is the capital of France and"], ["is", "s the"], ["."],
                                  ["🎆 never there", "x" * 256]], ids=["space", "longer", "overlapping", "dot",
                                                                       "long-unicode"])
def test_streamed_equals_non_streamed_for_stop_configurations(client, stop):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stop=stop)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason


def test_streamed_equals_non_streamed_with_a_stop_token(client, bundled):
    tok = bundled[1]
    stop_id = tok(" capital")["input_ids"][0]
    kwargs = dict(model=MODEL, prompt="Paris is the", max_tokens=12, temperature=0,
                  extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.text
