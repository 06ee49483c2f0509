"""The kvstore's key space: where block metadata, pins and shard reservations live in Redis, and
the metadata node that the kvstore's parts share.

A *block* here is one chain hash under one quant mode, all layers together (the worker writes
the layers' bytes itself and then commits the block). Its metadata member is "{quant}:{hash}":

    ringserve:kvmeta:access           ZSET  member -> last access (unix s)      LRU and TTL
    ringserve:kvmeta:importance       ZSET  member -> accumulated attention mass (H2O)
    ringserve:kvmeta:leaves           ZSET  member -> eviction priority, only blocks with no stored child
    ringserve:kvmeta:bytes            HASH  member -> bytes of all its layers
    ringserve:kvmeta:block:<member>   HASH  model, quant, hash, layers, parent member, children
    ringserve:kvmeta:pins:<request>   SET   members pinned by an in-flight request (expires after the TTL)
    ringserve:kvmeta:pinned_requests  ZSET  request -> when it first pinned
    ringserve:kvmeta:released:<request>     a request that has unpinned (for RELEASED_TTL_S): late pins are refused
    ringserve:kvmeta:shards           HASH  "<request>:<member>" -> bytes of that decode shard (reserved)
    ringserve:kvmeta:shards_seen      ZSET  "<request>:<member>" -> its last reservation (unix s)
    ringserve:kvmeta:stats            HASH  counters: bytes, blocks, bytes:<quant>, shard_bytes, hits, ...

The metadata lives on the first Redis node; block bytes are spread over all nodes by consistent
hashing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry.metrics import Meter
from redis.asyncio import Redis

from shared.kv.keys import KEY_NAMESPACE, KVBlockKey
from shared.kv.metrics import IndexMetrics
from shared.kv.nodes import RedisNodes
from shared.settings import Settings

T = TypeVar("T")

META = f"{KEY_NAMESPACE}:kvmeta"
ACCESS = f"{META}:access"
IMPORTANCE = f"{META}:importance"
LEAVES = f"{META}:leaves"
BYTES = f"{META}:bytes"
STATS = f"{META}:stats"
PINNED_REQUESTS = f"{META}:pinned_requests"
SHARDS = f"{META}:shards"
SHARDS_SEEN = f"{META}:shards_seen"
META_NODE = 0  # index in settings.redis_urls
# The error of a reply that needed the metadata node while it was unreachable.
META_UNAVAILABLE = "kv metadata store unavailable"


def member(quant: str, chain_hash: str) -> str:
    return f"{quant}:{chain_hash}"


def block_meta_key(block: str) -> str:
    return f"{META}:block:{block}"


def pins_key(request_id: str) -> str:
    return f"{META}:pins:{request_id}"


def released_key(request_id: str) -> str:
    return f"{META}:released:{request_id}"


def shard_member(request_id: str, member: int) -> str:
    return f"{request_id}:{member}"


def block_keys(model_id: str, quant: str, chain_hash: str, num_layers: int) -> list[str]:
    """The Redis keys of every layer of one block."""
    return [KVBlockKey(model_id, layer, chain_hash, quant).redis_key() for layer in range(num_layers)]


class MetadataStore:
    """What the kvstore's parts share: the Redis nodes (the metadata on `META_NODE`), the settings,
    the clock and the metrics. The settings are read at each call, so replacing them takes effect."""

    def __init__(self, settings: Settings, meter: Meter | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.nodes = RedisNodes.from_settings(settings, decode_responses=True)
        self.metrics = IndexMetrics(meter)
        self.clock = clock

    async def meta(self, fn: Callable[[Redis], Awaitable[T]], default: T | None = None) -> T | None:
        """Run `fn` on the metadata node; `default` when it is unreachable."""
        return await self.nodes.call(META_NODE, fn, default)

    async def close(self) -> None:
        await self.nodes.close()
