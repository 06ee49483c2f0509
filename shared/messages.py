"""Pydantic models of every message on the bus, public and internal.

Public messages travel as JSON or msgpack on `ringserve.v1.*`; the subject carries the API
version. Internal messages carry `v` (schema version) and may hold tensors (see codec.py).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator,
)

from shared.attention.pattern import KeyPattern

SCHEMA_VERSION = 1
# top_k above any vocabulary; bounded so every command it travels in encodes (msgpack: 64-bit ints)
MAX_TOP_K = 2**31 - 1
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Internal(BaseModel):
    """Internal messages: tensors allowed, unknown fields ignored (newer senders stay readable)."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)
    v: int = SCHEMA_VERSION


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


# ================================================================================================
# Internal: liveness and the torch.distributed world
# ================================================================================================


class ModelInfo(_Internal):
    name: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    eos_token_ids: list[int] = Field(default_factory=list)
    dtype: str
    # Mistral-style sliding window of the model's sliding layers (None: full causal attention).
    sliding_window: int | None = None
    sliding_layers: list[int] = Field(default_factory=list)  # the layers that slide (indices)


class WorkerHeartbeat(_Internal):
    worker_id: str
    # "cpu" or "cuda" (RINGSERVE_DEVICE): the scheduler forms the world over one kind and picks
    # its torch.distributed backend from it (services/scheduler/registry.py)
    device: str
    model: ModelInfo
    # host:port of the rendezvous store this worker hosts, used when it is chosen as rank 0
    store_addr: str
    world_generation: int
    world_rank: int | None
    busy: bool
    active_requests: int
    kv_tokens: int
    draining: bool = False
    # KV tokens this worker can hold in all (settings.worker_max_tokens); None: no limit
    kv_capacity_tokens: int | None = None
    # Fusion partitions the worker's requests send partials to: a draining fusion instance
    # serves until no worker lists it.
    fusion_partitions: list[str] = Field(default_factory=list)


class ServiceHeartbeat(_Internal):
    service: str
    instance: str
    draining: bool = False


class FusionHeartbeat(ServiceHeartbeat):
    partition: str  # the fusion instance's partition: requests placed on it send their partials there
    pending_groups: int = 0


class WorldForm(_Internal):
    """The scheduler's decision of who is in the torch.distributed world, and in what rank order."""

    generation: int
    members: list[str]  # worker ids; the index is the rank
    store_addr: str  # hosted by members[0]
    backend: Literal["gloo", "nccl"]


class WorldReady(_Internal):
    worker_id: str
    generation: int
    ok: bool
    error: str | None = None


# ================================================================================================
# Internal: placement, prefill, decode
# ================================================================================================


class Segment(_Internal):
    """A run of prompt positions [start, end) held by one ring member."""

    start: int
    end: int


class RingPlan(_Internal):
    """The layout of one request over an ordered ring of workers."""

    request_id: str
    workers: list[str]  # ring order
    world_ranks: list[int]  # the world rank of each ring member (same order)
    world_generation: int
    chunk_tokens: int  # the placement unit the prompt was dealt in (at most the policy chunk)
    # segments[i]: the prompt positions ring member i holds (zigzag: units i and 2N-1-i, ...)
    segments: list[list[Segment]]
    prompt_tokens: int
    fusion_partition: str
    fusion: Literal["bus", "collective"] = "bus"
    kv_quant: KVQuant = KVQuant.NONE

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def units(self) -> int:
        """How many placement units of chunk_tokens the prompt was cut into (the last may be shorter)."""
        return -(-self.prompt_tokens // self.chunk_tokens)

    def leader(self) -> int:
        """The ring member holding the last prompt position: it samples the tokens."""
        last = self.prompt_tokens - 1
        for member, segments in enumerate(self.segments):
            if any(s.start <= last < s.end for s in segments):
                return member
        raise ValueError("no ring member holds the last prompt position")


class SamplingParams(_Internal):
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False


class PromptBlock(BaseModel):
    """One full KV block of the prompt, tokens [start, end), as shared/kv/keys.py's BlockRef names it."""

    model_config = ConfigDict(extra="ignore")
    index: int
    start: int
    end: int
    chain_hash: str
    parent_hash: str = ""


class DecodePlan(_Internal):
    """How the ring leader's decode loop runs a request after its prefill: until `max_new_tokens`
    tokens (the prefill's first one included) or a token of `stop_token_ids` (EOS included),
    each new token published to `events` (the owning scheduler's token subject)."""

    max_new_tokens: int = Field(ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    events: str
    # the scheduler instance that owns the request: a leader ends the request if it goes silent
    owner: str = ""
    # W3C trace headers of the request's root span: the workers' decode spans hang under it
    trace: dict[str, str] = Field(default_factory=dict)
    # The client's reply subject and encoding: if the owner goes silent, the leader tells the
    # client (`unavailable`) instead of leaving it waiting for a reply nobody will send.
    reply: str = ""
    reply_content_type: str = ""


class PrefillCommand(_Internal):
    plan: RingPlan
    member: int  # this worker's index in plan.workers
    # token ids of this member's segments, concatenated in segment order
    input_ids: list[int]
    sampling: SamplingParams
    # leading prompt tokens whose KV the worker loads from the KV store instead of computing
    cached_tokens: int = 0
    # the prompt's full blocks that overlap this member's segments: what it loads and stores
    # (empty when the KV store is off)
    kv_blocks: list[PromptBlock] = Field(default_factory=list)
    # the decode that follows on the worker (the leader runs it; the others follow its ticks)
    decode: DecodePlan | None = None
    # the request's attention pattern, in prefill and in every decode step of every member
    # (None: the model's own attention)
    attention: AttentionSpec | None = None


class PrefillProgress(_Internal):
    request_id: str
    layers_done: int
    layers: int


class PrefillResult(_Internal):
    request_id: str
    member: int
    ok: bool
    # set by the leader: the first generated token
    token_id: int | None = None
    logprob: float | None = None
    error_code: ErrorCode | None = None
    error: str | None = None
    kv_tokens: int = 0
    # prompt positions of this member whose K/V came from the KV store (0 when its load missed)
    cached_tokens: int = 0
    # ok=False because the prefill was aborted (`AbortCommand`: the client cancelled the request),
    # not because it failed; the scheduler ends the request with finish_reason `cancelled`
    cancelled: bool = False


class DecodeStep(_Internal):
    """One decode step of one request. Built by the ring leader's decode loop, and sent by it to
    the other members of a multi-worker ring (`worker.<id>.decode`) so they run the same step."""

    request_id: str
    step: int  # 0-based index of the generated token being fed back
    token_id: int
    position: int
    # ring member that appends this token's K/V to its shard
    append_member: int
    sampling: SamplingParams
    # leader -> members: the request ended (no step to run): release it
    finish: bool = False


class DecodeResult(_Internal):
    request_id: str
    member: int
    step: int
    ok: bool
    token_id: int | None = None
    logprob: float | None = None
    error_code: ErrorCode | None = None
    error: str | None = None


class TokenItem(_Internal):
    """A token the ring leader generated, or the end of its request's decode on error."""

    request_id: str
    index: int  # in the request's output (0 is the prefill's token, never sent here)
    token_id: int | None = None
    logprob: float | None = None
    finish: Literal["length", "stop"] | None = None  # the worker ended the request with this token
    error_code: ErrorCode | None = None
    error: str | None = None


class DecodeTokens(_Internal):
    """Worker -> scheduler (`tokens.<scheduler instance>`): one step's tokens of every request
    this worker leads for that scheduler."""

    worker_id: str
    items: list[TokenItem]


class ReleaseCommand(_Internal):
    request_id: str


class AbortCommand(_Internal):
    """Scheduler -> every ring member of a request being prefilled: the client cancelled it. The
    members stop together at a layer boundary and answer the prefill with `cancelled`."""

    request_id: str


# ================================================================================================
# Internal: fusion (partial attention results of one decode step)
# ================================================================================================


class PartialItem(_Internal):
    """One ring member's partial attention for one request, one layer, one decode step.

    out: [tokens, heads, head_dim] float32, normalised by the member's local softmax denominator;
    lse: [tokens, heads] float32, the log of that denominator (-inf where the member saw nothing).
    """

    request_id: str
    step: int
    layer: int
    member: int
    parts: int  # how many members contribute
    out: torch.Tensor
    lse: torch.Tensor


class FusionRequest(_Internal):
    worker_id: str
    items: list[PartialItem]


class MergedItem(_Internal):
    request_id: str
    step: int
    layer: int
    out: torch.Tensor  # [tokens, heads, head_dim] float32, the exact global attention output
    lse: torch.Tensor


class FusionDrop(_Internal):
    request_id: str


class FusionReply(_Internal):
    items: list[MergedItem]
    error: str | None = None
