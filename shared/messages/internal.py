"""Internal messages between the services (msgpack; they carry `v`, the schema version, and may
hold tensors, see codec.py): liveness, the torch.distributed world, prefill and decode
commands, tokens, and fusion's partial attention results."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from shared.messages.base import _Internal
from shared.messages.public import AttentionSpec, ErrorCode, KVQuant


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
    # The worker's prefix-cache tiers (`ringserve status`): prompt blocks kept in its KV pool
    # (the device tier: pages, bytes) and in its host memory (the host tier: bytes held, limit).
    resident_pages: int = 0
    resident_bytes: int = 0
    host_tier_bytes: int = 0
    host_tier_limit_bytes: int = 0


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
