"""The public API's messages on `ringserve.v1.*` (JSON or msgpack; the subject carries the API
version): requests, replies, stream events, errors, status."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator,
)

from shared.attention.pattern import KeyPattern
from shared.messages.base import MAX_TOP_K, RequestId, _Strict


# ================================================================================================
# Public API
# ================================================================================================


class ErrorCode(str, enum.Enum):
    INVALID_REQUEST = "invalid_request"
    TOO_LONG = "too_long"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"


class KVQuant(str, enum.Enum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


class AttentionMode(str, enum.Enum):
    FULL = "full"
    SLIDING = "sliding"
    STRIDED = "strided"
    HYBRID = "hybrid"


# The sizes each mode takes: all of them required, any other refused.
ATTENTION_MODE_SIZES: dict[AttentionMode, tuple[str, ...]] = {
    AttentionMode.FULL: (),
    AttentionMode.SLIDING: ("window",),
    AttentionMode.STRIDED: ("window", "stride"),
    AttentionMode.HYBRID: ("window", "sinks"),
}


class AttentionSpec(_Strict):
    """A request's attention pattern (shared/attention/pattern.py has the masks):
    full: the model's own attention (causal; a model's own sliding layers keep their window);
    sliding: the last `window` keys (i - W < j <= i); hybrid: the first `sinks` positions plus the
    window; strided: the window plus every `stride`-th key position (j % K == 0). A mode other
    than full applies in every layer."""

    mode: AttentionMode
    window: StrictInt | None = Field(default=None, ge=1)
    sinks: StrictInt | None = Field(default=None, ge=1)
    stride: StrictInt | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _sizes_of_the_mode(self) -> "AttentionSpec":
        wanted = ATTENTION_MODE_SIZES[self.mode]
        for name in ("window", "sinks", "stride"):
            given = getattr(self, name) is not None
            if name in wanted and not given:
                raise ValueError(f"attention mode {self.mode.value!r} needs '{name}'")
            if name not in wanted and given:
                raise ValueError(f"attention mode {self.mode.value!r} takes no '{name}'")
        return self

    def key_pattern(self) -> KeyPattern | None:
        """The pattern's masks; None for full (the model's own attention)."""
        if self.mode is AttentionMode.FULL:
            return None
        return KeyPattern(window=self.window, sinks=self.sinks or 0, stride=self.stride)


class GenerateRequest(_Strict):
    # Strict types: "1", 1.0 and true are not token ids, "yes" is not a boolean (no coercion).
    prompt: StrictStr | None = None
    # fail_fast: a million wrong ids give one error, not a million (which took seconds to report)
    input_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(fail_fast=True)] | None = None
    max_new_tokens: StrictInt = Field(default=64, ge=1)
    temperature: StrictFloat = Field(default=0.0, ge=0.0, le=100.0)  # an int is a float; true and "1" are not
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=0, le=MAX_TOP_K)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[Annotated[StrictStr, Field(min_length=1)]] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] = Field(default_factory=list, max_length=64,
                                                                    fail_fast=True)
    # As vLLM's ignore_eos: the model's EOS does not end the request (stop_token_ids still do);
    # benchmarks and tests use it to get exactly max_new_tokens from any checkpoint.
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    logprobs: StrictBool = False
    request_id: RequestId | None = None
    kv_quant: KVQuant | None = None
    attention: AttentionSpec | None = None  # None: full

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("prompt", "stop")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        """JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode."""
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"text is not valid Unicode: {exc.reason} at {exc.start}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("exactly one of 'prompt' or 'input_ids' is required")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("'input_ids' must not be empty")
        if self.prompt is not None and not self.prompt:
            raise ValueError("'prompt' must not be empty")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # fraction of the causal score matrix (prefill and decode, all layers) the pattern skipped
    attention_sparsity: float = 0.0


class Timings(BaseModel):
    queue_ms: float
    ttft_ms: float
    total_ms: float


class Placement(BaseModel):
    """How a request was laid out: the ring's workers in rank order, the size of the units the
    prompt was dealt zigzag in (at most the policy chunk) and how many there are."""

    workers: list[str]
    chunk_tokens: int
    chunks: int


FinishReason = Literal["length", "stop", "cancelled"]


class GenerateReply(BaseModel):
    request_id: str
    output_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    usage: Usage
    timings: Timings
    placement: Placement | None = None


class ProgressEvent(BaseModel):
    type: Literal["progress"] = "progress"
    request_id: str
    done_tokens: int
    total_tokens: int


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
    request_id: str
    index: int
    token_id: int
    text: str | None = None
    logprob: float | None = None


class DoneEvent(GenerateReply):
    type: Literal["done"] = "done"


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    request_id: str | None = None


class ErrorReply(BaseModel):
    error: ErrorBody


class CancelRequest(_Strict):
    request_id: RequestId


class CancelReply(BaseModel):
    request_id: str
    cancelled: bool


class WorkerStatus(BaseModel):
    worker_id: str
    device: str
    busy: bool
    active_requests: int
    kv_tokens: int
    last_seen_s: float
    kv_capacity_tokens: int | None = None  # None: no limit
    # Its prefix-cache tiers: prompt blocks kept in its KV pool (device tier) and in host memory.
    resident_pages: int = 0
    resident_bytes: int = 0
    host_tier_bytes: int = 0
    host_tier_limit_bytes: int = 0  # 0: no host tier


class ServiceStatus(BaseModel):
    """One instance of a service other than a worker, as its heartbeats tell."""

    service: str
    instance: str
    draining: bool
    last_seen_s: float


class QueuedRequest(_Strict):
    """A request waiting for workers with room, as the scheduler orders them."""

    request_id: StrictStr
    place: StrictInt = Field(ge=1)  # 1: placed first once there is room
    prefill_tokens: StrictInt = Field(ge=0)  # its prompt tokens no cached block covers: the order's key
    waited_s: float = Field(ge=0)


class StatusReply(BaseModel):
    model: str | None
    workers: list[WorkerStatus]
    queued_requests: int  # waiting for a worker or for room (those for room are also in `queue`)
    active_requests: int
    world_generation: int
    world_ready: bool = False
    world_members: list[str] = Field(default_factory=list)
    world_backend: Literal["gloo", "nccl"] | None = None  # chosen from the members' devices
    services: list[ServiceStatus] = Field(default_factory=list)  # every scheduler, fusion, kvstore, gateway
    queue: list[QueuedRequest] = Field(default_factory=list)  # in the order they will be placed
