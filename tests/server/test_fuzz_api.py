"""A fuzz test of the HTTP API (Hypothesis): random and extreme values for every field of
/v1/completions and /v1/chat/completions, random bodies and headers, while well-formed requests
run alongside. Every answer is a 2xx or a 4xx in OpenAI's error shape, never a 5xx; a 2xx stream
is well-formed to its [DONE]; the well-formed requests always get their expected outputs; and
/health keeps answering fast. Examples are bounded and derandomized (the same ones every run)."""

import json
import threading
import time

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import MODEL

BIG_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]
ODD_FLOATS = [0.0, -0.0, 1e-40, 5e-324, 1e-5, 0.5, 1.0, 2.0, 2.0000001, 1e6, 1e308, float("inf"), float("-inf"),
              float("nan")]
ROLES = ["system", "user", "assistant", "developer", "tool", "wizard", ""]

ints = st.one_of(st.integers(-3, 8), st.sampled_from(BIG_INTS))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ODD_FLOATS))
short_text = st.text(max_size=12)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, short_text)
anything = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(short_text, scalars, max_size=2))


# Valid values (edges included) for every field; each body is valid but for 0-2 fields, which get
# anything at all (extremes, wrong types, NaN / Infinity, nesting). Small output lengths keep each
# example cheap.
VOCAB = 49152
valid_sampling = {
    "temperature": st.one_of(st.sampled_from([0.0, 1e-40, 5e-324, 2.0]), st.floats(0, 2)),
    "top_p": st.one_of(st.just(1.0), st.floats(1e-300, 1)), "top_k": st.one_of(st.integers(0, 60), st.just(2**31 - 1)),
    "seed": st.one_of(st.integers(-5, 5), st.sampled_from([-(2**63), 2**63, 2**64 - 1])),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=6), max_size=4),
                      st.lists(st.text(min_size=256, max_size=256), min_size=16, max_size=16)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3), "ignore_eos": st.booleans(),
    "n": st.integers(1, 3), "best_of": st.one_of(st.none(), st.integers(1, 3)), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.sampled_from([None, False, True, 0, 2, 5]), "top_logprobs": st.integers(0, 5),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.one_of(st.just(1.0), st.floats(0.01, 2)), "min_tokens": st.integers(0, 4),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                            "type": "object", "properties": {"a": {"type": "integer"}}}}}]),
    "user": short_text,
}
valid_prompt = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
                         st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=1),
                         st.text(alphabet="🎆東京 ab\n\t\x00", min_size=1, max_size=12))
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": short_text}), min_size=1, max_size=2)
valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES[:3]),
                                                 "content": st.one_of(short_text, parts)}), min_size=1, max_size=3)
mutations = st.one_of(ints, floats, anything, st.lists(ints, max_size=3), st.lists(short_text, min_size=15, max_size=18))


@st.composite
def fuzzed_body(draw, required: dict) -> bytes:
    body = {"model": MODEL, "max_tokens": draw(st.integers(1, 4))}
    body.update({name: draw(value) for name, value in required.items()})
    body.update({name: draw(value) for name, value in valid_sampling.items() if draw(st.booleans())})
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        names = ["model", "max_tokens", *required, *valid_sampling, "echo", "max_completion_tokens", "unknown"]
        body[draw(st.sampled_from(names))] = draw(mutations)
    if not isinstance(body.get("max_tokens"), int):
        body["ignore_eos"] = False  # the default length (the rest of the context) stops at EOS
    return json.dumps(body).encode()


completion = fuzzed_body({"prompt": valid_prompt, "echo": st.booleans()})
chat = fuzzed_body({"messages": valid_messages})
headers = st.one_of(st.just({}), st.just({}), st.dictionaries(
    st.sampled_from(["content-type", "accept", "x-request-id", "authorization", "openai-organization", "user-agent"]),
    st.sampled_from(["application/json", "text/plain", "multipart/form-data", "*/*", "application/json; charset=latin-1",
                     "Bearer x", "", "a" * 500]), max_size=3)).map(lambda h: {"content-type": "application/json", **h})
requests = st.one_of(
    st.tuples(st.just("/v1/completions"), completion, headers),
    st.tuples(st.just("/v1/chat/completions"), chat, headers),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              st.one_of(st.binary(max_size=64), st.recursive(scalars, lambda c: st.lists(c, max_size=3), max_leaves=8)
                        .map(lambda x: json.dumps(x).encode())), headers),
)


def check_reply(reply: httpx.Response, streamed: str | None) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text)
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == reply.status_code
        return
    assert 200 <= reply.status_code < 300
    if streamed is None:
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", streamed
    for event in events[:-1]:
        assert "error" not in json.loads(event), event


class WellFormed(threading.Thread):
    """Greedy requests with known answers, and /health probes, in a loop until stopped."""

    def __init__(self, url: str, expected: list[tuple[str, dict, str]]) -> None:
        super().__init__(daemon=True)
        self.url, self.expected = url, expected
        self.stop, self.failures, self.health_s, self.done = threading.Event(), [], [], 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                for path, body, text in self.expected:
                    t0 = time.perf_counter()
                    health = client.get("/health")
                    self.health_s.append(time.perf_counter() - t0)
                    got = answer(client.post(path, json=body).json())
                    if health.status_code != 200 or got != text:
                        self.failures.append((path, got, text, health.status_code))
                    self.done += 1


def answer(out: dict) -> str:
    choice = out["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_fuzzed_requests_get_2xx_or_4xx_in_openai_shape(server_url):
    good = [("/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                                 "temperature": 0, "ignore_eos": True}),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Name a color."}],
                                      "max_tokens": 6, "temperature": 0})]
    expected = [(path, b, answer(httpx.post(f"{server_url}{path}", json=b, timeout=120).json())) for path, b in good]
    alongside = WellFormed(server_url, expected)
    alongside.start()
    client = httpx.Client(base_url=server_url, timeout=120)
    seen = []  # (status, streamed)

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests)
    def fuzz(request):
        path, content, extra_headers = request
        with client.stream("POST", path, content=content, headers=extra_headers) as reply:
            text = reply.read().decode()
        is_stream = reply.headers.get("content-type", "").startswith("text/event-stream")
        check_reply(reply, text if is_stream else None)
        seen.append((reply.status_code, is_stream))

    try:
        fuzz()
    finally:
        alongside.stop.set()
        alongside.join(timeout=120)
        client.close()
    assert not alongside.failures, alongside.failures[:3]
    assert (200, True) in seen and (200, False) in seen and (400, False) in seen, "one kind of answer never came"
    assert alongside.done >= 2, "the well-formed requests did not run alongside"
    # Liveness, not speed (the machine may be busy): no /health probe waited on the fuzzed traffic.
    assert alongside.health_s and max(alongside.health_s) < 10, sorted(alongside.health_s)[-5:]
