"""OpenAI-compatible request and response bodies (the subset qoq serves), as pydantic models."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from qoq.sampling import SamplingParamError, SamplingParams, validate_choices


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = ""
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """The sampling fields both endpoints share (OpenAI's defaults, plus vLLM-style extras)."""

    # A field qoq does not implement is a 400 naming it (errors.py), never silently ignored: the
    # client would believe it got what it asked for. Infinity / NaN (Python's JSON reads them) are
    # refused here with the field's name.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    user: str | None = None  # an end-user id for the caller's own records: it changes nothing
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # extension
    min_tokens: int = 0  # extension
    logit_bias: dict[str, float] | None = None  # token id (a string in JSON) -> bias
    best_of: int | None = None
    # Structured output (server/structured.py): response_format, or the vLLM-style extensions.
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None  # Lark or GBNF, as llguidance reads them

    def logprobs_params(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) for SamplingParams; each endpoint has its own fields."""
        return None, None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises ValueError (-> 400; a SamplingParamError names the field) on values out of range."""
        validate_choices(self.n, self.best_of, self.stream)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        logprobs, prompt_logprobs = self.logprobs_params()
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop=stop,
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              output_kind="delta" if self.stream else "final",
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
                              logit_bias=self._logit_bias(), logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise SamplingParamError("logit_bias", "logit_bias keys must be token ids (integers as strings)") from None

    @property
    def num_choices(self) -> int:
        """Sequences per prompt: best_of of them, the n best returned."""
        return self.best_of or self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    def logprobs_params(self) -> tuple[int | None, int | None]:
        # An int (the legacy API): 0 is the chosen token's logprob only; false / null: none.
        if self.logprobs is None or self.logprobs is False:
            return None, None
        if self.logprobs is True:
            raise SamplingParamError("logprobs", "logprobs must be an integer in [0, 20] for completions")
        return self.logprobs, (self.logprobs if self.echo else None)


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None

    def logprobs_params(self) -> tuple[int | None, int | None]:
        if self.logprobs not in (None, True, False, 0, 1):
            raise SamplingParamError("logprobs", "logprobs must be true or false for chat completions")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise SamplingParamError("top_logprobs", "top_logprobs needs logprobs: true")
            if not 0 <= self.top_logprobs <= 20:
                raise SamplingParamError("top_logprobs", f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        return (self.top_logprobs or 0) if self.logprobs else None, None
    tools: list[Tool] | None = None  # server/tools.py
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: dict | None = None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: dict | None = None  # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: dict | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt (add_special_tokens as a completion does) or chat messages
    (templated as a chat completion is)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qoq"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]

