"""The API around the completions: API keys, several served names, /tokenize, /detokenize,
/version, and fields qoq does not implement (a 400 naming them, never silently ignored)."""

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, OpenAI

from server_helpers import API_KEY as KEY
from server_helpers import MODEL
from server_helpers import SERVED_NAMES as NAMES


@pytest.fixture(scope="module")
def keyed_url(keyed_server_url):
    return keyed_server_url


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_needs_the_key(keyed_url):
    assert httpx.get(f"{keyed_url}/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/version"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                         ("GET", "/no/such/route")]:
        for headers in ({}, auth("wrong"), {"Authorization": KEY}):
            reply = httpx.request(method, f"{keyed_url}{path}", headers=headers, json={})
            assert reply.status_code == 401, (method, path, headers)
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{keyed_url}/v1/models", headers=auth()).status_code == 200


def test_openai_client_with_and_without_the_key(keyed_url):
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong").models.list()
    client = OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == NAMES
    assert client.models.retrieve(NAMES[1]).id == NAMES[1]
    # Either name reaches the model; responses carry the first.
    texts = set()
    for name in NAMES:
        out = client.completions.create(model=name, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert out.model == NAMES[0]
        texts.add(out.choices[0].text)
    assert len(texts) == 1
    with pytest.raises(Exception) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert getattr(err.value, "status_code", None) == 404


def test_tokenize_and_detokenize_round_trip(server_url, bundled):
    tok = bundled[1]
    text = "Paris is the capital of France."
    reply = httpx.post(f"{server_url}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert reply["tokens"] == tok(text)["input_ids"] and reply["count"] == len(reply["tokens"])
    assert reply["max_model_len"] == 256
    bare = httpx.post(f"{server_url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "Hi there"}]
    chat = httpx.post(f"{server_url}/tokenize", json={"messages": messages}).json()
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat["tokens"] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    back = httpx.post(f"{server_url}/detokenize", json={"model": MODEL, "tokens": reply["tokens"]}).json()
    assert back["prompt"] == tok.decode(reply["tokens"])


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "a"}, "model"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenize_errors_name_the_field(server_url, path, body, param):
    reply = httpx.post(f"{server_url}{path}", json=body)
    assert reply.status_code in (400, 404), reply.text
    assert reply.json()["error"]["param"] == param


def test_version(server_url):
    from qoq import __version__

    assert httpx.get(f"{server_url}/version").json() == {"version": __version__}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("field, value", [("suffix", "x"), ("no_such_option", 1), ("function_call", "auto")])
def test_unimplemented_fields_are_refused_by_name(client, endpoint, field, value):
    kwargs = dict(model=MODEL, max_tokens=2, extra_body={field: value})
    with pytest.raises(BadRequestError) as err:
        if endpoint == "completions":
            client.completions.create(prompt="hi", **kwargs)
        else:
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert err.value.body["param"] == field
    assert field in err.value.body["message"] and "does not support" in err.value.body["message"]


def test_user_field_is_accepted(client):
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, user="someone")
    assert out.choices[0].text is not None
