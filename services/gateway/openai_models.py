"""The OpenAI-shaped request and response bodies the gateway speaks (the subset it serves).

Requests are validated strictly: a field OpenAI does not define, and that is not one of ours
(`top_k`, `kv_quant`, `attention`), is a 400. Fields OpenAI defines but ringserve cannot honour
yet are accepted at their neutral values and refused otherwise (see translate.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import AttentionSpec, KVQuant

# OpenAI's own bounds.
MAX_STOP_SEQUENCES = 4
MAX_TEMPERATURE = 2.0
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
PENALTY_BOUND = 2.0
# OpenAI's default for /v1/completions when max_tokens is absent.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0

TokenIds = list[Annotated[int, Field(ge=0)]]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """What both endpoints share: the model, sampling, streaming and our own extra fields."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-PENALTY_BOUND, le=PENALTY_BOUND)
    frequency_penalty: float | None = Field(default=None, ge=-PENALTY_BOUND, le=PENALTY_BOUND)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # ringserve's own: passed to the NATS request
    top_k: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None  # as vLLM's extra sampling parameter
    kv_quant: KVQuant | None = None
    attention: AttentionSpec | None = None  # the NATS API's attention pattern, passed through


class CompletionRequest(_Sampling):
    # a string, token ids, or a list of exactly one of them (checked in translate.py)
    prompt: str | TokenIds | list[str] | list[TokenIds]
    max_tokens: int | None = Field(default=COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """Accepted by the schema so that the answer is `unsupported`, not a validation error."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_image", "input_audio", "file"]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    # assistant tool calls and tool results: refused as `unsupported` (translate.py)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None


# ---- responses ---------------------------------------------------------------------------------


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageBody | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ringserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
