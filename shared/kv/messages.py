"""Messages between workers/scheduler and the kvstore service (metadata only: no block bytes).

Every reply model has defaults for all fields and an `error`: the service answers bad input with
`KVErrorReply`, which decodes as any reply with `error` set.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.kv.keys import HASH_HEX_CHARS
from shared.messages.base import SCHEMA_VERSION, RunId

# 1M-token prompts in blocks of 16 tokens; anything longer is a malformed message.
MAX_BLOCKS_PER_MESSAGE = 65_536
MAX_MODEL_ID_CHARS = 512

QuantName = Literal["none", "int8", "int4"]
ChainHash = Annotated[str, Field(pattern=f"^[0-9a-f]{{{HASH_HEX_CHARS}}}$")]
ModelId = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_ID_CHARS)]
BlockCount = Annotated[int, Field(ge=1, le=MAX_BLOCKS_PER_MESSAGE)]


class _KVMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    v: int = SCHEMA_VERSION


class _KVReply(_KVMessage):
    error: str | None = None


class KVLookupRequest(_KVMessage):
    model_id: ModelId
    quant: QuantName
    num_layers: BlockCount
    hashes: list[ChainHash] = Field(max_length=MAX_BLOCKS_PER_MESSAGE)  # chain order


class KVLookupReply(_KVReply):
    blocks: int = 0  # leading blocks stored for all layers


class KVCommitBlock(_KVMessage):
    index: int = Field(ge=0)
    chain_hash: ChainHash
    parent_hash: ChainHash | Literal[""] = ""


class KVCommitRequest(_KVMessage):
    model_id: ModelId
    quant: QuantName
    num_layers: BlockCount
    blocks: list[KVCommitBlock] = Field(max_length=MAX_BLOCKS_PER_MESSAGE)
    nbytes: int = Field(ge=0)  # of all listed blocks, all layers
    # pins the blocks for this request (the one that computed them) until it is unpinned
    request_id: RunId | None = None


class KVCommitReply(_KVReply):
    stored: int = 0  # blocks new to the index
    evicted: int = 0
    rejected: int = 0  # new blocks not kept: no room left in the budget (the rest pinned or shards)


class KVTouch(_KVMessage):
    chain_hash: ChainHash
    # attention mass this block received since the last touch (H2O's accumulated score)
    importance: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)


class KVTouchRequest(_KVMessage):
    model_id: ModelId
    quant: QuantName
    touches: list[KVTouch] = Field(max_length=MAX_BLOCKS_PER_MESSAGE)


class KVPinRequest(_KVMessage):
    request_id: RunId
    action: Literal["pin", "unpin"] = "pin"
    model_id: ModelId | None = None
    quant: QuantName = "none"
    hashes: list[ChainHash] = Field(default_factory=list, max_length=MAX_BLOCKS_PER_MESSAGE)


class KVAck(_KVReply):
    ok: bool = False


class KVShardRequest(_KVMessage):
    """A ring member's decode shard (shared/kv/shards.py) counts against the KV budget: each
    increment reserves its bytes before it is written; deleting the shard releases them all."""

    request_id: RunId
    member: int = Field(ge=0)
    action: Literal["reserve", "release"] = "reserve"
    nbytes: int = Field(default=0, ge=0)


class KVShardReply(_KVReply):
    granted: bool = False  # reserve: the increment may be written


class KVStatsRequest(_KVMessage):
    pass


class KVStats(_KVReply):
    blocks: int = 0
    bytes_stored: int = 0
    budget_bytes: int = 0
    # where budget_bytes came from: "explicit" (RINGSERVE_KV_BUDGET_BYTES), "maxmemory" or
    # "system_memory" of the Redis nodes, "fallback" before any node told its memory
    budget_source: str = ""
    bytes_by_quant: dict[str, int] = Field(default_factory=dict)
    blocks_by_quant: dict[str, int] = Field(default_factory=dict)
    hits: int = 0  # lookup blocks found
    misses: int = 0  # lookup blocks not found
    hit_rate: float = 0.0
    evictions: int = 0  # for the budget
    rejected: int = 0  # committed blocks not kept for want of room
    expired: int = 0  # past their TTL
    lost: int = 0  # indexed but their bytes were gone from Redis
    pinned_blocks: int = 0
    pinned_requests: int = 0
    # decode shards of requests in flight: counted in the same budget, never evicted
    shard_bytes: int = 0
    shards: int = 0
    shard_refusals: int = 0  # increments not written for want of room

    @property
    def total_bytes(self) -> int:
        """What counts against `budget_bytes`: prefix blocks and shards."""
        return self.bytes_stored + self.shard_bytes


class KVErrorReply(_KVReply):
    error: str
