"""Tools on /v1/chat/completions: which templates take them, the messages and tools handed to the
template, the grammar for tool_choice "required" / a named function, and the model's tool calls
parsed back into OpenAI's `tool_calls`.

The parser reads Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
(Qwen2.5, Hermes, SmolLM3...) and Llama-3.1-style bare JSON (`{"name": ..., "parameters": ...}`,
optionally after `<|python_tag|>`, or a list of such objects); what precedes the first call is
the message's content. Output that does not parse as calls is plain content.
"""

from __future__ import annotations

import json
import re
import uuid

from qoq.server.errors import ApiError
from qoq.server.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, Tool, ToolCall

TOOL_CALL_TAG = "<tool_call>"
PYTHON_TAG = "<|python_tag|>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def template_takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template (any of them, when it has several) renders `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and re.search(r"\btools\b", t) for t in templates)


def _arguments_value(text: str):
    """An earlier call's arguments as the template expects them: the parsed object (templates
    render it with `tojson`), or the text when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The template's messages: assistant tool_calls and tool results kept, not dropped."""
    out = []
    for m in messages:
        d: dict = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name,
                                             "arguments": _arguments_value(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def active_tools(req: ChatCompletionRequest, tokenizer) -> list[Tool] | None:
    """The tools handed to the template (None: none, tool_choice "none" included); ApiError 400
    when the template cannot take them or tool_choice names a function not among them."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if not template_takes_tools(tokenizer):
        raise ApiError(400, "tools: this model's chat template does not render tools (it never references "
                            "`tools`); serve it with a tool-aware template (qoq serve --chat-template FILE) or "
                            "send tool_choice \"none\"", param="tools")
    if not isinstance(choice, (str, type(None))) and choice.function.name not in {t.function.name for t in req.tools}:
        raise ApiError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                       param="tool_choice")
    return req.tools


def tool_dicts(tools: list[Tool]) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in tools]


def _call_schema(tool: Tool) -> dict:
    params = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_choice_schema(req: ChatCompletionRequest, tools: list[Tool]) -> dict | None:
    """The JSON schema the output must follow: a named function, one call of any tool, or (with
    parallel_tool_calls) a non-empty list of calls. None for "auto" (free text or calls)."""
    choice = req.tool_choice
    if choice is None or choice == "auto":
        return None
    if choice == "required":
        one = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools]}
        return {"type": "array", "items": one, "minItems": 1} if req.parallel_tool_calls else one
    return _call_schema(next(t for t in tools if t.function.name == choice.function.name))


def _as_call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=obj["name"], arguments=text))


def _calls_from_json(text: str) -> list[ToolCall] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(v) for v in items]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of the model's output; no calls: (text, [])."""
    start = text.find(TOOL_CALL_TAG)
    if start >= 0:
        calls: list[ToolCall] = []
        for block in _BLOCK.findall(text[start:]):
            parsed = _calls_from_json(block)
            if parsed is None:
                return text, []
            calls += parsed
        content = text[:start].strip()
        return content or None, calls
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if body[:1] in ("{", "["):
        parsed = _calls_from_json(body)
        if parsed:
            return None, parsed
    return text, []


class ToolStream:
    """Streaming with tools: content is passed on as it comes until it could be the start of a
    call (a `<tool_call>` tag, or output opening with `{`, `[` or `<|python_tag|>`); from there
    the text is held and parsed when the request finishes, and the calls go out whole in one
    delta at the end."""

    def __init__(self) -> None:
        self.text = ""
        self.num_sent = 0
        self.holding = False

    def feed(self, new_text: str) -> str:
        """The content that can be sent now."""
        self.text += new_text
        if self.holding:
            return ""
        head = self.text.lstrip()
        if not head or PYTHON_TAG.startswith(head[:len(PYTHON_TAG)]) or head[0] in "{[":
            if head and (head[0] in "{[" or head.startswith(PYTHON_TAG)):
                self.holding = True
            return ""  # nothing but white space (or the start of a tag) yet
        tag = self.text.find(TOOL_CALL_TAG, self.num_sent)
        end = tag if tag >= 0 else len(self.text)
        if tag >= 0:
            self.holding = True
        else:  # hold back what could be the start of a tag
            for keep in range(min(len(TOOL_CALL_TAG) - 1, len(self.text)), 0, -1):
                if TOOL_CALL_TAG.startswith(self.text[-keep:]):
                    end = len(self.text) - keep
                    break
        out, self.num_sent = self.text[self.num_sent:end], max(self.num_sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, the calls)."""
        content, calls = parse_tool_calls(self.text)
        if not calls:
            return self.text[self.num_sent:], []
        start = self.text.find(TOOL_CALL_TAG)
        rest = self.text[self.num_sent:start] if start >= self.num_sent else ""
        return rest.rstrip(), calls
