"""Penalties, logit_bias, min_tokens, logprobs, echo, n / best_of and prompt lists through the
`openai` client against a real `qoq serve` (fp32 bundled model, KV16), checked against the dense
forward of the same model."""

import httpx
import pytest
import torch

from server_helpers import MODEL, metric

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and"


def dense_logprobs(model, ids):
    with torch.inference_mode():
        return torch.log_softmax(model.compute_logits(model(torch.tensor([ids]))[0]).double(), -1)


def dense_greedy(model, ids, num_tokens):
    """prompt + num_tokens greedy tokens of the dense no-cache forward (what the fp32 KV16 server picks)."""
    ids = list(ids)
    for _ in range(num_tokens):
        ids.append(int(dense_logprobs(model, ids)[-1].argmax()))
    return ids


def test_completion_logprobs_with_echo_equal_the_dense_forward(client, bundled):
    model, tok = bundled
    prompt = tok(PROMPT)["input_ids"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    lp = choice.logprobs
    ids = dense_greedy(model, prompt, 4)
    assert choice.text == PROMPT + tok.decode(ids[len(prompt):]) and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    ref = dense_logprobs(model, ids)
    for pos in range(1, len(ids)):
        assert abs(lp.token_logprobs[pos] - ref[pos - 1, ids[pos]].item()) < 1e-3, pos
        top = ref[pos - 1].topk(2)
        texts = {tok.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        for text, value in texts.items():
            assert abs(lp.top_logprobs[pos][text] - value) < 1e-3
    assert lp.text_offset[len(prompt)] == len(PROMPT)  # the generated tokens start after the echo
    assert lp.text_offset == sorted(lp.text_offset)


def test_logprobs_zero_gives_the_chosen_tokens_only(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3
    assert all(top == {t: v} for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))


def test_chat_logprobs_streamed_equal_non_streamed_and_the_dense_forward(client, bundled):
    model, tok = bundled
    messages = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [c for chunk in stream for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == [(c.token, round(c.logprob, 4)) for c in content]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ids = dense_greedy(model, prompt, len(content))
    assert [tok.decode([t]) for t in ids[len(prompt):]] == [c.token for c in content]
    ref = dense_logprobs(model, ids)
    for i, c in enumerate(content):
        row = len(prompt) + i - 1
        assert abs(c.logprob - ref[row, ids[row + 1]].item()) < 1e-3
        assert bytes(c.bytes).decode() == c.token
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(ref[row].topk(3).values.tolist(), abs=1e-3)


def test_n_choices_differ_reproduce_and_share_the_prompts_pages(client, server_url, bundled):
    _, tok = bundled
    prompt = "A unique prompt for sharing pages: " + PROMPT  # not cached by another test
    full_pages = (len(tok(prompt)["input_ids"]) - 1) // 16  # the server's page size
    hits = metric(server_url, "qoq_prefix_cache_hits_total")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert metric(server_url, "qoq_prefix_cache_hits_total") - hits == 2 * full_pages * 16
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3,
                                       stream=True)
    streamed = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    assert r.usage.completion_tokens == 24


def test_best_of_returns_the_highest_cumulative_logprob(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11, logprobs=0)
    every = client.completions.create(n=4, **kwargs).choices
    totals = {c.text: sum(c.logprobs.token_logprobs) for c in every}
    best = client.completions.create(n=2, best_of=4, **kwargs).choices
    expected = sorted(totals, key=totals.get, reverse=True)[:2]
    assert [c.text for c in sorted(best, key=lambda c: c.index)] == expected


def test_a_list_of_prompts_gives_choices_in_order(client, bundled):
    _, tok = bundled
    prompts = ["The capital of France is", "1, 2, 3,"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    choices = sorted(r.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
        assert choices[2 * p].text == choices[2 * p + 1].text == alone  # greedy: every choice the same
    assert r.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)
    ids = [tok(p)["input_ids"] for p in prompts]
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True)
    for choice, prompt in zip(sorted(echoed.choices, key=lambda c: c.index), prompts):
        assert choice.text.startswith(prompt)  # a token-id prompt echoes its text


def test_logit_bias_min_tokens_and_penalties(client, bundled):
    _, tok = bundled
    token = tok(" banana", add_special_tokens=False)["input_ids"][0]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=1.0,
                                  logit_bias={str(token): 100}, logprobs=0)
    assert r.choices[0].logprobs.tokens == [tok.decode([token])] * 4
    eos = str(tok.eos_token_id)
    stopped = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logit_bias={eos: 100})
    held = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logit_bias={eos: 100}, extra_body={"min_tokens": 3},
                                     temperature=0)
    assert stopped.usage.completion_tokens == 0 and held.usage.completion_tokens == 3
    assert held.choices[0].finish_reason == "stop"
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0)
    penal = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0,
                                      frequency_penalty=2.0, extra_body={"repetition_penalty": 1.5})
    # The prompt repeats itself; the penalties make the continuation repeat less.
    def repeats(tokens):
        return len(tokens) - len(set(tokens))
    assert repeats(penal.choices[0].logprobs.tokens) < repeats(plain.choices[0].logprobs.tokens)


BAD = [
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"logit_bias": {"60000": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 150}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"five": 1}}, "logit_bias"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"n": 1, "best_of": 2, "stream": True}, "best_of"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"presence_penalty": 9}, "presence_penalty"),
]


@pytest.mark.parametrize("route, fields, param", BAD)
def test_bad_values_are_400s_naming_the_field(server_url, route, fields, param):
    body = {"model": MODEL, **({"prompt": "hi"} if "chat" not in route else
                               {"messages": [{"role": "user", "content": "hi"}]}), **fields}
    r = httpx.post(f"{server_url}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
