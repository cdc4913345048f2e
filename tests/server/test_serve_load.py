"""The server under load: outputs equal the offline LLM's at 1 and 64 concurrent clients, `qoq bench
serve` counts what the server's usage says, a full queue answers 503, a request that can never
fit answers 400, and the server keeps serving after each."""

import asyncio
import threading

import httpx
import pytest
from server_helpers import ENGINE_CONFIG, MODEL

from qoq.bench.serve import BenchConfig, DatasetArgs, bench_record
from qoq.engine.llm import LLM
from qoq.sampling import SamplingParams

WORDS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "1, 2, 3, 4,",
         "Once upon a time", "The quick brown fox", "import numpy as", "Dear Sir or Madam,"]


def _requests(n: int) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs: prompts of different lengths, some stopping early on EOS."""
    return [(" ".join(WORDS[i % len(WORDS)] for _ in range(1 + i % 3)) + f" {i}", 4 + i % 9) for i in range(n)]


@pytest.fixture(scope="module")
def offline(bundled):
    llm = LLM.from_model(*bundled, **ENGINE_CONFIG)
    reqs = _requests(64)
    outs = llm.generate([p for p, _ in reqs], [SamplingParams(max_tokens=m, temperature=0) for _, m in reqs])
    return {p: (o.text, o.finish_reason, len(o.token_ids)) for (p, _), o in zip(reqs, outs)}


async def _complete(client: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    if not stream:
        reply = await client.post("/v1/completions", json=body)
        out = reply.json()
        return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]
    import json

    text, reason, usage = "", None, None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
            usage = chunk.get("usage") or usage
    return text, reason, usage["completion_tokens"]


@pytest.mark.parametrize("concurrency", [1, 64])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_outputs_equal_offline_llm(server_url, offline, concurrency, stream):
    reqs = _requests(concurrency)

    async def run():
        async with httpx.AsyncClient(base_url=server_url, timeout=300,
                                     limits=httpx.Limits(max_connections=None)) as client:
            return await asyncio.gather(*(_complete(client, p, m, stream) for p, m in reqs))

    got = asyncio.run(run())
    assert got == [offline[p] for p, _ in reqs]


def test_bench_serve_counts_tokens_from_usage(server_url):
    config = BenchConfig(base_url=server_url, request_rate=50.0, max_concurrency=4, progress=False)
    dataset = DatasetArgs("random", num_prompts=6, input_len=12, output_len=5, vocab_size=32000)
    record = bench_record(config, dataset)
    assert (record["completed"], record["failed"]) == (6, 0)
    assert record["total_input_tokens"] == 6 * 12 and record["total_output_tokens"] == 6 * 5
    assert record["input_len"] == 12 and record["output_len"] == 5 and record["dataset"] == "random"
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(record[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < record[key]["p50"] <= record[key]["p99"]
    assert record["output_tokens_per_s"] > 0


def test_full_queue_gets_503_and_never_fits_gets_400(tiny_server_url):
    url = f"{tiny_server_url}/v1/completions"
    long_body = {"model": "random-tiny-w16a16kv16", "prompt": [5] * 8, "max_tokens": 1000, "temperature": 0,
                 "ignore_eos": True, "stream": True}
    # The cache holds 64 pages of 16 tokens: 8 + 1020 tokens can never fit, whatever else runs
    # (8 + 1000 fits, and keeps a holder in flight long enough for the probe below).
    never = httpx.post(url, json={**long_body, "max_tokens": 1020, "stream": False}, timeout=30)
    assert never.status_code == 400 and "whole cache holds 1024" in never.json()["error"]["message"]
    # One running + one queued fill the server; a third is refused at once. Each holder is counted
    # in flight once its 200 headers arrive (the server submits before it answers), so the probe
    # waits for both: otherwise the probe could take a holder's place and the holder get the 503.
    done, statuses, admitted = [], [], [threading.Event(), threading.Event()]

    def hold(i):
        with httpx.stream("POST", url, json=long_body, timeout=120) as reply:
            statuses.append(reply.status_code)
            admitted[i].set()
            lines = [line for line in reply.iter_lines() if line.startswith("data:")]
            done.append(lines[-1])

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for t, event in zip(threads, admitted):
        t.start()
        assert event.wait(timeout=60), "a holding request got no answer"
    assert statuses == [200, 200]
    refused = httpx.post(url, json={**long_body, "stream": False, "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503, "no 503 while two requests filled a server of max_num_seqs 1 + queue 1"
    assert refused.headers["retry-after"] == "1" and "capacity" in refused.json()["error"]["message"]
    for t in threads:
        t.join(timeout=120)
    assert done == ["data: [DONE]"] * 2
    ok = httpx.post(url, json={**long_body, "stream": False, "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_bench_serve_asks_for_n_and_logprobs_and_times_each_choice():
    from qoq.bench.serve import BenchRequest, RequestResult, _body, summarize

    req = BenchRequest(prompt=[1, 2, 3], prompt_len=3, output_len=8)
    plain = _body(req, "m", chat=False, ignore_eos=True)
    assert plain["temperature"] == 0.0 and "n" not in plain and "logprobs" not in plain
    body = _body(req, "m", chat=False, ignore_eos=True, n=4, logprobs=5)
    assert body["n"] == 4 and body["temperature"] == 1.0 and body["logprobs"] == 5
    chat = _body(req, "m", chat=True, ignore_eos=True, logprobs=5)
    assert chat["logprobs"] is True and chat["top_logprobs"] == 5
    # 4 choices of 11 tokens streamed side by side: 10 more tokens each in the 1 s after the first
    done = RequestResult(ok=True, prompt_tokens=3, output_tokens=44, ttft_s=0.1, latency_s=1.1)
    record = summarize(BenchConfig(n=4), [req], [done], duration=1.1, prefix_cache_hit_rate=None)
    assert record["n"] == 4 and record["tpot_ms"]["p50"] == 100.0
