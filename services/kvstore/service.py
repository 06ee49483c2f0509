"""The kvstore service's logic: the metadata of stored KV blocks, in Redis, shared by replicas.

A *block* here is one chain hash under one quant mode, all layers together (the worker writes
the layers' bytes itself and then commits the block). Its metadata member is "{quant}:{hash}":

    ringserve:kvmeta:access           ZSET  member -> last access (unix s)      LRU and TTL
    ringserve:kvmeta:importance       ZSET  member -> accumulated attention mass (H2O)
    ringserve:kvmeta:leaves           ZSET  member -> eviction priority, only blocks with no stored child
    ringserve:kvmeta:bytes            HASH  member -> bytes of all its layers
    ringserve:kvmeta:block:<member>   HASH  model, quant, hash, layers, parent member, children
    ringserve:kvmeta:pins:<request>   SET   members pinned by an in-flight request (expires after the TTL)
    ringserve:kvmeta:pinned_requests  ZSET  request -> when it pinned
    ringserve:kvmeta:stats            HASH  counters: bytes, blocks, bytes:<quant>, hits, misses, ...

Eviction takes the unpinned *leaf* with the lowest priority = last access + weight * importance,
so a chain shrinks from its tail (without block i, blocks i+1.. could never be reached) and, of
two blocks used at the same time, the one that drew more attention stays longer. The metadata
lives on the first Redis node; block bytes are spread over all nodes by consistent hashing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog
from opentelemetry.metrics import Meter
from redis.asyncio import Redis

from shared.kv.keys import KEY_NAMESPACE, KVBlockKey
from shared.kv.messages import (
    KVAck,
    KVCommitReply,
    KVCommitRequest,
    KVLookupReply,
    KVLookupRequest,
    KVPinRequest,
    KVStats,
    KVTouchRequest,
)
from shared.kv.metrics import IndexMetrics
from shared.kv.nodes import RedisNodes
from shared.settings import Settings

log = structlog.get_logger("kvstore")
T = TypeVar("T")

META = f"{KEY_NAMESPACE}:kvmeta"
ACCESS = f"{META}:access"
IMPORTANCE = f"{META}:importance"
LEAVES = f"{META}:leaves"
BYTES = f"{META}:bytes"
STATS = f"{META}:stats"
PINNED_REQUESTS = f"{META}:pinned_requests"
META_NODE = 0  # index in settings.redis_urls
# Eviction reads this many lowest-priority leaves at a time.
EVICTION_WINDOW = 64
# stats counter that each reason for dropping a block increments
DROP_COUNTERS = {"budget": "evictions", "ttl": "expired", "lost": "lost"}


def member(quant: str, chain_hash: str) -> str:
    return f"{quant}:{chain_hash}"


def block_meta_key(block: str) -> str:
    return f"{META}:block:{block}"


def pins_key(request_id: str) -> str:
    return f"{META}:pins:{request_id}"


def eviction_priority(last_access: float, importance: float, weight_s: float) -> float:
    """Lower goes first: each unit of attention mass counts as `weight_s` seconds of recency."""
    return last_access + weight_s * importance


def split_bytes(total: int, parts: int) -> list[int]:
    """Spread `total` bytes over `parts` blocks as evenly as integers allow."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class KVStoreService:
    def __init__(self, settings: Settings, meter: Meter | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.nodes = RedisNodes.from_settings(settings, decode_responses=True)
        self.metrics = IndexMetrics(meter)
        self.clock = clock

    def _priority(self, last_access: float, importance: float) -> float:
        return eviction_priority(last_access, importance, self.settings.kv_importance_weight_s)

    async def _meta(self, fn: Callable[[Redis], Awaitable[T]], default: T | None = None) -> T | None:
        """Run `fn` on the metadata node; `default` when it is unreachable."""
        return await self.nodes.call(META_NODE, fn, default)

    # ---- requests ---------------------------------------------------------------------------

    async def lookup(self, req: KVLookupRequest) -> KVLookupReply:
        """How many leading blocks are stored for all `num_layers` layers (their bytes checked)."""
        members = [member(req.quant, h) for h in req.hashes]

        async def layers_of(r: Redis):
            pipe = r.pipeline(transaction=False)
            for m in members:
                pipe.hget(block_meta_key(m), "layers")
            return await pipe.execute()

        layers = await self._meta(layers_of)
        if layers is None:
            return KVLookupReply(blocks=0)
        indexed = 0
        for stored_layers in layers:
            if stored_layers is None or int(stored_layers) < req.num_layers:
                break
            indexed += 1

        present = await self._bytes_present(req.model_id, req.quant, req.hashes[:indexed], req.num_layers)
        hits = next((i for i, ok in enumerate(present) if not ok), indexed)
        if hits < indexed:
            # The index must stop claiming a block whose bytes are gone (Redis restarted, key expired).
            await self._drop(members[hits], "lost")
        await self._mark_accessed(members[:hits])
        misses = len(members) - hits

        async def count(r: Redis):
            pipe = r.pipeline(transaction=False)
            pipe.hincrby(STATS, "hits", hits)
            pipe.hincrby(STATS, "misses", misses)
            await pipe.execute()

        await self._meta(count)
        self.metrics.lookup(hits, misses)
        return KVLookupReply(blocks=hits)

    async def commit(self, req: KVCommitRequest) -> KVCommitReply:
        """The worker has written all layers of these blocks: index them, then enforce the budget."""
        if not req.blocks:
            return KVCommitReply()
        now = self.clock()
        blocks = sorted(req.blocks, key=lambda b: b.index)  # parents before children
        members = [member(req.quant, b.chain_hash) for b in blocks]
        sizes = split_bytes(req.nbytes, len(blocks))

        async def claim(r: Redis):
            # HSETNX claims a block exactly once, even when two workers (or replicas) commit it together.
            pipe = r.pipeline(transaction=False)
            for m, size in zip(members, sizes):
                pipe.hsetnx(BYTES, m, size)
            return await pipe.execute()

        claimed = await self._meta(claim)
        if claimed is None:
            return KVCommitReply(error="kv metadata store unavailable")
        new = [(b, m, size) for b, m, size, c in zip(blocks, members, sizes, claimed) if c]
        parents = {member(req.quant, b.parent_hash) for b, _, _ in new if b.parent_hash}
        parent_exists = await self._meta(lambda r: _exists_in_hash(r, BYTES, parents), {})

        async def index(r: Redis):
            pipe = r.pipeline(transaction=True)
            for b, m, size in new:
                parent = member(req.quant, b.parent_hash) if b.parent_hash else ""
                pipe.hset(
                    block_meta_key(m),
                    mapping={"model": req.model_id, "quant": req.quant, "hash": b.chain_hash,
                             "layers": req.num_layers, "parent": parent, "children": 0},
                )
                pipe.zadd(ACCESS, {m: now})
                pipe.zadd(LEAVES, {m: self._priority(now, 0.0)})
                if parent and parent_exists.get(parent):
                    pipe.hincrby(block_meta_key(parent), "children", 1)
                    pipe.zrem(LEAVES, parent)
            new_bytes = sum(size for _, _, size in new)
            if new:
                for field, amount in (("bytes", new_bytes), (f"bytes:{req.quant}", new_bytes),
                                      ("blocks", len(new)), (f"blocks:{req.quant}", len(new))):
                    pipe.hincrby(STATS, field, amount)
            await pipe.execute()

        await self._meta(index)
        await self._mark_accessed([m for m, c in zip(members, claimed) if not c])
        if req.request_id:
            await self._pin(req.request_id, members)
        evicted = await self.evict_to_budget()
        return KVCommitReply(stored=len(new), evicted=evicted)

    async def touch(self, req: KVTouchRequest) -> KVAck:
        """Blocks were attended to: refresh their access time and add their attention mass."""
        members = [member(req.quant, t.chain_hash) for t in req.touches]
        if not members:
            return KVAck(ok=True)
        indexed = await self._meta(lambda r: r.zmscore(ACCESS, members))
        if indexed is None:
            return KVAck(ok=False, error="kv metadata store unavailable")
        known = [(m, t.importance) for m, t, score in zip(members, req.touches, indexed) if score is not None]
        now = self.clock()

        async def add_importance(r: Redis):
            pipe = r.pipeline(transaction=False)
            for m, importance in known:
                pipe.zincrby(IMPORTANCE, importance, m)
            totals = await pipe.execute()
            pipe = r.pipeline(transaction=False)
            for (m, _), total in zip(known, totals):
                pipe.zadd(ACCESS, {m: now}, xx=True)
                pipe.zadd(LEAVES, {m: self._priority(now, total)}, xx=True)
            await pipe.execute()
            return True

        ok = await self._meta(add_importance, False) if known else True
        return KVAck(ok=bool(ok))

    async def pin(self, req: KVPinRequest) -> KVAck:
        if req.action == "unpin":
            ok = await self._meta(lambda r: r.delete(pins_key(req.request_id)), None)
            await self._meta(lambda r: r.zrem(PINNED_REQUESTS, req.request_id))
            await self.evict_to_budget()  # what the request held may have kept the store over budget
            return KVAck(ok=ok is not None)
        ok = await self._pin(req.request_id, [member(req.quant, h) for h in req.hashes])
        return KVAck(ok=ok)

    async def stats(self) -> KVStats:
        counters = await self._meta(lambda r: r.hgetall(STATS))
        pinned = await self._pinned()
        if counters is None or pinned is None:
            return KVStats(error="kv metadata store unavailable", budget_bytes=self.settings.kv_budget_bytes)
        requests, blocks = pinned
        c = {k: int(v) for k, v in counters.items()}
        hits, misses = c.get("hits", 0), c.get("misses", 0)
        bytes_by_quant = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("bytes:") and v}
        blocks_by_quant = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("blocks:") and v}
        hit_rate = hits / (hits + misses) if hits + misses else None
        self.metrics.stored(bytes_by_quant, blocks_by_quant, hit_rate)
        return KVStats(
            blocks=c.get("blocks", 0),
            bytes_stored=c.get("bytes", 0),
            budget_bytes=self.settings.kv_budget_bytes,
            bytes_by_quant=bytes_by_quant,
            blocks_by_quant=blocks_by_quant,
            hits=hits,
            misses=misses,
            hit_rate=hit_rate or 0.0,
            evictions=c.get("evictions", 0),
            expired=c.get("expired", 0),
            lost=c.get("lost", 0),
            pinned_blocks=len(blocks),
            pinned_requests=requests,
        )

    # ---- budget and TTL ---------------------------------------------------------------------

    async def evict_to_budget(self) -> int:
        """Drop unpinned leaves, lowest priority first, until the stored bytes fit the budget."""
        pinned = await self._pinned()
        if pinned is None:
            return 0
        _, pinned_blocks = pinned
        evicted, offset = 0, 0
        while True:
            total = await self._meta(lambda r: r.hget(STATS, "bytes"))
            if total is None or int(total) <= self.settings.kv_budget_bytes:
                return evicted
            window = await self._meta(lambda r: r.zrange(LEAVES, offset, offset + EVICTION_WINDOW - 1), [])
            if not window:
                log.warning("kv_over_budget_all_pinned", bytes=int(total), budget=self.settings.kv_budget_bytes)
                return evicted
            victim = next((m for m in window if m not in pinned_blocks), None)
            if victim is None:
                offset += len(window)
                continue
            if await self._drop(victim, "budget") is None:
                return evicted
            evicted, offset = evicted + 1, 0

    async def sweep_expired(self) -> int:
        """Drop every unpinned block not accessed within the TTL; the bytes carry the same TTL in Redis."""
        cutoff = self.clock() - self.settings.kv_ttl_s
        old = await self._meta(lambda r: r.zrangebyscore(ACCESS, "-inf", cutoff), [])
        pinned = await self._pinned()
        if not old or pinned is None:
            return 0
        dropped = 0
        for m in old:
            if m not in pinned[1] and await self._drop(m, "ttl") is not None:
                dropped += 1
        return dropped

    # ---- internals --------------------------------------------------------------------------

    async def _bytes_present(self, model_id: str, quant: str, hashes: Sequence[str], num_layers: int) -> list[bool]:
        """Whether every layer's bytes of each block exist (one EXISTS per block and node)."""
        per_node: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)
        for i, h in enumerate(hashes):
            keys_by_node: dict[int, list[str]] = defaultdict(list)
            for layer in range(num_layers):
                key = KVBlockKey(model_id, layer, h, quant).redis_key()
                keys_by_node[self.nodes.node_for(key)].append(key)
            for node, keys in keys_by_node.items():
                per_node[node].append((i, keys))
        present = [True] * len(hashes)
        for node, checks in per_node.items():

            async def exists(r: Redis, checks=checks):
                pipe = r.pipeline(transaction=False)
                for _, keys in checks:
                    pipe.exists(*keys)
                return await pipe.execute()

            counts = await self.nodes.call(node, exists, None)
            for (i, keys), count in zip(checks, counts or [0] * len(checks)):
                present[i] = present[i] and count == len(keys)
        return present

    async def _mark_accessed(self, members: list[str]) -> None:
        if not members:
            return
        now = self.clock()

        async def mark(r: Redis):
            importance = await r.zmscore(IMPORTANCE, members)
            pipe = r.pipeline(transaction=False)
            for m, imp in zip(members, importance):
                pipe.zadd(ACCESS, {m: now}, xx=True)
                pipe.zadd(LEAVES, {m: self._priority(now, imp or 0.0)}, xx=True)
            await pipe.execute()

        await self._meta(mark)

    async def _pin(self, request_id: str, members: list[str]) -> bool:
        async def pin(r: Redis):
            pipe = r.pipeline(transaction=True)
            if members:
                pipe.sadd(pins_key(request_id), *members)
            # A request that never unpins (its worker died) stops pinning after the TTL.
            pipe.expire(pins_key(request_id), self.settings.kv_ttl_s)
            pipe.zadd(PINNED_REQUESTS, {request_id: self.clock()})
            await pipe.execute()
            return True

        return bool(await self._meta(pin, False))

    async def _pinned(self) -> tuple[int, set[str]] | None:
        """(live pinning requests, the members they pin), forgetting requests older than the TTL."""

        async def read(r: Redis):
            await r.zremrangebyscore(PINNED_REQUESTS, "-inf", self.clock() - self.settings.kv_ttl_s)
            requests = await r.zrange(PINNED_REQUESTS, 0, -1)
            blocks = await r.sunion(*[pins_key(q) for q in requests]) if requests else set()
            return len(requests), set(blocks)

        return await self._meta(read)

    async def _drop(self, block: str, reason: str) -> int | None:
        """Remove one block (bytes and metadata); returns the bytes freed, None if Redis is unreachable."""
        info = await self._meta(lambda r: r.hgetall(block_meta_key(block)))
        if info is None:
            return None
        if info:
            await self._delete_bytes(info["model"], info["quant"], info["hash"], int(info["layers"]))

        async def forget(r: Redis):
            pipe = r.pipeline(transaction=True)
            pipe.hget(BYTES, block)
            pipe.hdel(BYTES, block)  # 1 for exactly one of several replicas dropping it at once
            pipe.delete(block_meta_key(block))
            pipe.zrem(ACCESS, block)
            pipe.zrem(IMPORTANCE, block)
            pipe.zrem(LEAVES, block)
            size, removed, *_ = await pipe.execute()
            if not removed:
                return 0
            size, quant = int(size or 0), block.split(":", 1)[0]
            pipe = r.pipeline(transaction=True)
            for field, amount in (("bytes", -size), (f"bytes:{quant}", -size), ("blocks", -1),
                                  (f"blocks:{quant}", -1), (DROP_COUNTERS[reason], 1)):
                pipe.hincrby(STATS, field, amount)
            await pipe.execute()
            self.metrics.evictions.add(1, {"reason": reason})
            return size

        freed = await self._meta(forget)
        parent = info.get("parent") if info else None
        if freed is not None and parent:
            await self._meta(lambda r: self._child_gone(r, parent))
        return freed

    async def _child_gone(self, r: Redis, parent: str) -> None:
        """A parent whose last stored child went becomes a leaf: evictable again."""
        if not await r.hexists(BYTES, parent):
            return
        children = await r.hincrby(block_meta_key(parent), "children", -1)
        if children <= 0:
            access, importance = await r.zmscore(ACCESS, [parent]), await r.zmscore(IMPORTANCE, [parent])
            await r.zadd(LEAVES, {parent: self._priority(access[0] or self.clock(), importance[0] or 0.0)})

    async def _delete_bytes(self, model_id: str, quant: str, chain_hash: str, num_layers: int) -> None:
        by_node: dict[int, list[str]] = defaultdict(list)
        for layer in range(num_layers):
            key = KVBlockKey(model_id, layer, chain_hash, quant).redis_key()
            by_node[self.nodes.node_for(key)].append(key)
        for node, keys in by_node.items():
            await self.nodes.call(node, lambda r, keys=keys: r.delete(*keys), 0)

    async def close(self) -> None:
        await self.nodes.close()


async def _exists_in_hash(r: Redis, key: str, fields: set[str]) -> dict[str, bool]:
    if not fields:
        return {}
    names = sorted(fields)
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hexists(key, name)
    return dict(zip(names, await pipe.execute()))
