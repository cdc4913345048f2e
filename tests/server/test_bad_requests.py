"""Bad inputs over raw HTTP: each gets a 4xx that says what is wrong, and nothing else is disturbed."""

import threading
import time

import httpx
import pytest
from server_helpers import MAX_MODEL_LEN, MODEL, metric


def post(url, path, body=None, content=None):
    return httpx.post(f"{url}{path}", json=body, content=content, timeout=60,
                      headers={"content-type": "application/json"})


BAD = [
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi " * (MAX_MODEL_LEN + 10)}, 400, "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n must be an integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, 400, "token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": 2**63}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64, "stream": True}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 1e6}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["x"] * 17}, 400, "at most 16"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": "x" * 300}, 400, "at most 256"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[b[3] for b in BAD])
def test_bad_request_gets_4xx_with_a_reason(server_url, path, body, status, message):
    reply = post(server_url, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["code"] == status


def test_a_tiny_temperature_is_greedy_not_empty(server_url):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "ignore_eos": True}
    greedy = post(server_url, "/v1/completions", {**body, "temperature": 0}).json()
    tiny = post(server_url, "/v1/completions", {**body, "temperature": 1e-40, "seed": 3}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"] != ""


def test_non_finite_numbers_name_their_field(server_url):
    reply = post(server_url, "/v1/completions", content=b'{"model": "%s", "prompt": "hi", "top_p": NaN}' % MODEL.encode())
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "top_p" and "finite" in error["message"]


def test_malformed_json(server_url):
    reply = post(server_url, "/v1/completions", content=b'{"model": "x", "prompt": ')
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_bad_requests_do_not_disturb_a_running_one(server_url, client):
    result = {}

    def good():
        out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        result["out"] = out

    solo = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True})
    thread = threading.Thread(target=good)
    thread.start()
    for path, body, status, _ in BAD:
        assert post(server_url, path, body).status_code == status
    thread.join(timeout=120)
    assert result["out"].choices[0].text == solo.choices[0].text
    assert result["out"].usage.completion_tokens == 24


def test_client_disconnect_frees_pages(server_url):
    aborted = metric(server_url, 'qoq_request_finished_total{model_name="smollm2-135m",finish_reason="abort"')
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert metric(server_url, "qoq_kv_cache_pages_used") > 0
    deadline = time.monotonic() + 30
    while metric(server_url, "qoq_kv_cache_pages_used") > 0 or metric(server_url, "qoq_num_requests_running") > 0:
        assert time.monotonic() < deadline, "pages of a disconnected client were not freed"
        time.sleep(0.2)
    assert metric(server_url, 'qoq_request_finished_total{model_name="smollm2-135m",finish_reason="abort"') \
        == aborted + 1


def test_metrics_and_health(server_url):
    assert httpx.get(f"{server_url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server_url}/metrics").text
    for name in ("qoq_num_requests_running", "qoq_num_requests_waiting", "qoq_kv_cache_pages_used",
                 "qoq_generation_tokens_per_second", "qoq_generation_tokens_total"):
        assert f"# TYPE {name} " in text
    assert metric(server_url, "qoq_kv_cache_pages_total") == 64
