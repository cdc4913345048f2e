"""Through HTTP: a poisoned request among 8 concurrent ones fails alone (500 / an SSE error event, in
OpenAI's shape) while the 7 others get their exact greedy outputs; a device fault fails every
request and takes the server down instead of leaving it answering 503s.

The server runs in this process (the engine on a thread) so that the model can be patched to
fail: every token id passes validation, and the patched forward refuses one of them."""

import asyncio
import json

import httpx
import pytest
from faults import POISON, poison_forward
from reference import reference_generate

from qoq.engine.config import EngineConfig
from qoq.sampling import SamplingParams
from qoq.server.serve import BackgroundServer, free_port, make_server

TEXTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "1, 2, 3, 4,",
         "Once upon a time", "The quick brown fox", "import numpy as", "Dear Sir or Madam,"]
NAME = "isolation-test"


def serve(bundled):
    model, tok = bundled
    config = EngineConfig(kv_bits=16, page_size=16, num_pages=64, max_model_len=256, max_num_seqs=16)
    return BackgroundServer(make_server(model, tok, NAME, config, "127.0.0.1", free_port(), log_level="critical"))


async def complete(client, prompt, stream: bool):
    """(HTTP status, text or the error object)."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": stream}
    if not stream:
        reply = await client.post("/v1/completions", json=body)
        out = reply.json()
        return reply.status_code, out["choices"][0]["text"] if reply.status_code == 200 else out["error"]
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, chunk["error"]
            text += chunk["choices"][0]["text"]
    return reply.status_code, text


def run_concurrently(url, prompts):
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(complete(client, p, i % 2 == 1) for i, p in enumerate(prompts)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def reference(bundled):
    model, tok = bundled
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    return [reference_generate(model, tok, tok(t)["input_ids"], params).text for t in TEXTS]


@pytest.mark.parametrize("bad", [2, 5], ids=["json", "stream"])
def test_a_poisoned_request_among_8_fails_alone(bundled, reference, monkeypatch, bad):
    tok = bundled[1]
    poison_forward(monkeypatch, bundled[0], ValueError("poisoned token"))
    prompts = [tok(t)["input_ids"] + ([POISON] if i == bad else []) for i, t in enumerate(TEXTS)]
    with serve(bundled) as server:
        url = f"http://127.0.0.1:{server.server.config.port}"
        results = run_concurrently(url, prompts)
        for i, (status, out) in enumerate(results):
            if i == bad:
                assert status == 500 and "ValueError: poisoned token" in out["message"], out
                assert set(out) == {"message", "type", "param", "code"}
            else:
                assert (status, out) == (200, reference[i]), i
        metrics = httpx.get(f"{url}/metrics").text
        assert f'qoq_request_finished_total{{model_name="{NAME}",finish_reason="error"}} 1' in metrics
        assert f'qoq_engine_failed_steps_total{{model_name="{NAME}"}} 1' in metrics
        # ...and it keeps serving.
        assert run_concurrently(url, prompts[:2]) == [(200, reference[0]), (200, reference[1])]


def test_a_device_fault_fails_every_request_and_stops_the_server(bundled, monkeypatch):
    tok = bundled[1]
    poison_forward(monkeypatch, bundled[0], RuntimeError("CUDA error: an illegal memory access was encountered"))
    prompts = [tok(t)["input_ids"] + ([POISON] if i == 0 else []) for i, t in enumerate(TEXTS[:4])]
    with serve(bundled) as server:
        url = f"http://127.0.0.1:{server.server.config.port}"
        results = run_concurrently(url, prompts)
        # 500 for those in flight when it failed, 503 for any that came after.
        assert {status for status, _ in results} <= {500, 503} and results[0][0] == 500
        assert "CUDA error" in results[0][1]["message"]
        server.thread.join(timeout=30)
        assert not server.thread.is_alive(), "the server kept running without an engine"
        assert server.server.config.app.state.engine.failed
