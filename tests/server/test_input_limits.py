"""The server's edges: body size, errors in OpenAI's shape for every status, /v1/models/{id}, the
served name, and /health while a huge prompt is tokenized."""

import threading
import time

import httpx
import pytest
from server_helpers import MODEL

from qoq.server.errors import DEFAULT_MAX_REQUEST_BYTES
from qoq.server.serve import default_served_name


def assert_openai_error(reply: httpx.Response, status: int, words: str = "") -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert words in error["message"]
    return error


def test_a_body_over_the_limit_gets_413_announced_or_chunked(tiny_server_url):
    url = f"{tiny_server_url}/v1/completions"
    body = b'{"model": "m", "prompt": "' + b"x" * DEFAULT_MAX_REQUEST_BYTES + b'"}'
    reply = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(reply, 413, "--max-request-bytes")

    def chunks():  # no Content-Length: the limit counts what arrives
        for i in range(0, len(body), 2**16):
            yield body[i : i + 2**16]

    reply = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(reply, 413, "--max-request-bytes")
    assert httpx.get(f"{tiny_server_url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("method, path, content, status", [
    ("GET", "/v1/completions", None, 405),
    ("PUT", "/v1/chat/completions", b"{}", 405),
    ("DELETE", "/health", None, 405),
    ("GET", "/v1/nowhere", None, 404),
    ("POST", "/v1/completions", b'{"model": "\xff\xfe", "prompt": "hi"}', 400),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": "hi", "temperature": Infinity}', 400),
    ("POST", "/v1/completions", b"", 400),
    ("POST", "/v1/completions", b"null", 400),
])
def test_every_error_is_in_openai_shape(tiny_server_url, method, path, content, status):
    reply = httpx.request(method, f"{tiny_server_url}{path}", content=content, timeout=30,
                          headers={"content-type": "application/json"})
    assert_openai_error(reply, status)


def test_models_retrieve_with_the_openai_client(client):
    import openai

    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_unknown_model_id_is_404_in_openai_shape(server_url):
    error = assert_openai_error(httpx.get(f"{server_url}/v1/models/some/other-model"), 404, "does not exist")
    assert error["type"] == "not_found_error"


@pytest.mark.parametrize("model, random_config, expected", [
    ("smollm2-135m", None, "smollm2-135m"),
    ("/home/someone/models/Llama-3-8B-w4a8kv4", None, "Llama-3-8B-w4a8kv4"),
    ("/home/someone/models/Llama-3-8B/", None, "Llama-3-8B"),
    ("/data/gguf/SmolLM2-135M.Q4_1.gguf", None, "SmolLM2-135M.Q4_1"),
    ("ignored", "tiny", "random-tiny-w4a8kv4"),
    ("ignored", "/secret/path/my-config/config.json", "random-my-config-w4a8kv4"),
])
def test_the_default_served_name_is_never_a_path(model, random_config, expected):
    assert default_served_name(model, random_config, "w4a8kv4") == expected


def test_health_answers_while_a_huge_prompt_is_tokenized(server_url):
    """A prompt near the body limit takes seconds to tokenize: on a worker thread, not the loop.

    Were it tokenized on the event loop, /health would wait for it: a probe or two in all, one of
    them taking most of the huge request's time. No absolute times (the machine may be busy):
    many probes answered meanwhile, the slowest well under the huge request's time."""
    prompt = "The quick brown fox jumps over the lazy dog. " * (3 * 2**20 // 45)
    result = {}

    def huge():
        t0 = time.perf_counter()
        result["reply"] = httpx.post(f"{server_url}/v1/completions", json={"model": MODEL, "prompt": prompt},
                                     timeout=120)
        result["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=huge)
    thread.start()
    latencies = []
    while thread.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(f"{server_url}/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    thread.join()
    assert_openai_error(result["reply"], 400, "maximum context")
    assert len(latencies) >= 5, "the huge prompt was answered too fast to probe /health meanwhile"
    assert max(latencies) < result["seconds"] / 3, (latencies, result["seconds"])
