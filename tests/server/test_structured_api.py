"""Structured output and tools through the `openai` client against a real `qoq serve`:
response_format (json_object, json_schema) and guided_regex on both endpoints, streamed and not,
always parse and validate; bad schemas are 400s naming response_format; tools with a tool-aware
template (--chat-template) come back as OpenAI tool_calls, tool_choice "required" / named always
yields valid calls; tools on a template that cannot take them are a 400 naming tools."""

import json
import re

import jsonschema
import openai
import pytest
from conftest import TOOLS_TEMPLATE
from server_helpers import MODEL

from qoq.server.protocol import ChatMessage
from qoq.server.tools import ToolStream, message_dicts, parse_tool_calls, template_takes_tools

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def chat_text(client, stream=False, **kw):
    kw = {"model": MODEL, "messages": ASK, "max_tokens": 48, "temperature": 0, **kw}
    if not stream:
        out = client.chat.completions.create(**kw)
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_and_json_object(client, stream):
    text, reason = chat_text(client, stream, response_format=PERSON_FORMAT)
    assert reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    text, reason = chat_text(client, stream, response_format={"type": "json_object"}, temperature=0.8, seed=4)
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # ran to max_tokens inside the object
        assert reason == "length" and text.lstrip().startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_completions_response_format_and_guided_regex(client, stream):
    def complete(**kw):
        kw = {"model": MODEL, "prompt": "A person as JSON:", "max_tokens": 40, "temperature": 0, **kw}
        if not stream:
            out = client.completions.create(**kw)
            return out.choices[0].text, out.choices[0].finish_reason
        chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    text, reason = complete(extra_body={"response_format": PERSON_FORMAT})
    assert reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    text, reason = complete(extra_body={"guided_regex": r"(red|green|blue) [0-9]{2}"})
    assert reason == "stop" and re.fullmatch(r"(red|green|blue) [0-9]{2}", text)


def test_bad_schemas_are_400s_naming_response_format(client):
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
                {"type": "json_schema", "json_schema": {"name": "x"}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, response_format=fmt)
        assert "response_format" in str(err.value) and err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body={"guided_regex": "a(b"})
    assert err.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError, match="at most one"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=8,
                                  extra_body={"guided_regex": "a", "response_format": {"type": "json_object"}})
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason  # still up


def test_bundled_template_cannot_take_tools(client, bundled):
    assert not template_takes_tools(bundled[1])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=8, tools=[WEATHER])
    assert err.value.body["param"] == "tools" and "tools" in err.value.body["message"]
    out = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, tools=[WEATHER],
                                         tool_choice="none")
    assert out.choices[0].message.tool_calls is None


def test_history_tool_calls_and_tool_results_reach_the_template(bundled):
    import copy

    tok = copy.deepcopy(bundled[1])
    with open(TOOLS_TEMPLATE) as f:
        tok.chat_template = f.read()
    assert template_takes_tools(tok)
    messages = [ChatMessage(**m) for m in [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}]]
    text = tok.apply_chat_template(message_dicts(messages), tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in text and '"city": "Paris"' in text and "21 degrees, sunny" in text
    assert '"description": "The current weather in a city."' in text


def test_tool_call_parser():
    content, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
                                      '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Sure." and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("f", {"a": 1}), ("g", {})]
    content, calls = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"x": "y"}}')
    assert content is None and json.loads(calls[0].function.arguments) == {"x": "y"}
    _, calls = parse_tool_calls('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": 2}}]')
    assert [c.function.name for c in calls] == ["f", "g"]
    assert parse_tool_calls("{not json") == ("{not json", [])
    assert parse_tool_calls('{"answer": 42}') == ('{"answer": 42}', [])
    stream = ToolStream()
    sent = "".join(stream.feed(piece) for piece in ["Let me ", "check.<tool", '_call>{"name": "f", ',
                                                    '"arguments": {}}</tool_call>'])
    assert sent == "Let me check." and [c.function.name for c in stream.finish()[1]] == ["f"]
    stream = ToolStream()
    sent = "".join(stream.feed(piece) for piece in ["Hello <", "b> there"])
    assert sent + stream.finish()[0] == "Hello <b> there"


def _check_calls(calls, tools):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_always_yield_valid_calls(tools_client, stream):
    for choice, parallel, temperature in (("required", True, 0), ("required", False, 0.9),
                                          ({"type": "function", "function": {"name": "get_time"}}, True, 0.9)):
        kw = dict(model=MODEL, messages=ASK_WEATHER, max_tokens=64, temperature=temperature, seed=3,
                  tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=parallel)
        if not stream:
            out = tools_client.chat.completions.create(**kw)
            calls, reason = out.choices[0].message.tool_calls, out.choices[0].finish_reason
            assert out.choices[0].message.content is None
        else:
            chunks = [c for c in tools_client.chat.completions.create(stream=True, **kw) if c.choices]
            calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
            assert [t.index for t in calls] == list(range(len(calls)))
            assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()
            reason = chunks[-1].choices[0].finish_reason
        assert reason == "tool_calls"
        _check_calls(calls, [WEATHER, TIME])
        if not parallel or isinstance(choice, dict):
            assert len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0].function.name == "get_time"


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_gets_its_own_tool_calls(tools_client, stream):
    """n = 2 sampled choices with logprobs, tool_choice required: each choice's output is parsed
    into calls of its own (held back and sent whole per choice when streaming)."""
    kw = dict(model=MODEL, messages=ASK_WEATHER, max_tokens=64, temperature=0.9, seed=5, n=2, logprobs=True,
              tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    if not stream:
        out = tools_client.chat.completions.create(**kw)
        per_choice = {c.index: (c.message.tool_calls, c.finish_reason, c.message.content) for c in out.choices}
        assert all(c.logprobs and c.logprobs.content for c in out.choices)
    else:
        per_choice = {}
        for chunk in tools_client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                calls, reason, text = per_choice.get(c.index, ([], None, ""))
                per_choice[c.index] = (calls + list(c.delta.tool_calls or []), c.finish_reason or reason,
                                       text + (c.delta.content or ""))
    assert sorted(per_choice) == [0, 1]
    for calls, reason, text in per_choice.values():
        assert reason == "tool_calls" and not (text or "").strip()
        assert len(calls) == 1
        _check_calls(calls, [WEATHER, TIME])


def test_tools_auto_returns_parsed_calls_or_text(tools_client):
    out = tools_client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=64, temperature=0,
                                               tools=[WEATHER])
    message, reason = out.choices[0].message, out.choices[0].finish_reason
    if message.tool_calls:
        assert reason == "tool_calls"
        assert all(c.function.name and isinstance(json.loads(c.function.arguments), dict) for c in message.tool_calls)
    else:
        assert reason in ("stop", "length") and message.content
    # json_schema works on this server too, beside a tools request
    text, reason = chat_text(tools_client, response_format=PERSON_FORMAT)
    jsonschema.validate(json.loads(text), PERSON)
