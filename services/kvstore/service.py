"""The kvstore service's logic: the metadata of stored KV blocks, in Redis, shared by replicas.

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

Eviction takes the unpinned *leaf* with the lowest priority = last access + weight * importance,
so a chain shrinks from its tail (without block i, blocks i+1.. could never be reached) and, of
two blocks used at the same time, the one that drew more attention stays longer. The metadata
lives on the first Redis node; block bytes are spread over all nodes by consistent hashing.

**Budget.** `kv_budget_bytes` bounds the prefix blocks *and* the decode shards of requests in
flight (shared/kv/shards.py) together. Room is made before anything is added: a commit evicts
unpinned leaves for its new blocks and keeps only the leading ones that fit (the rest's bytes
are deleted, `rejected`); a worker reserves room for each shard increment before writing it
(`shard`), and is refused when even evicting every unpinned block would not make room. Shards
are never evicted (they are what a restore needs); they are released when deleted, or forgotten
by the sweep once their keys have expired (a dead worker). Decisions are serialized within a
replica (one lock), so the counters never exceed the budget; replicas can overshoot by what they
add at the same moment, which the next eviction takes back.

**TTL.** Block bytes expire `kv_ttl_s` after their last use: a write sets it; a lookup renews it
for the blocks it finds (the check that their bytes exist *is* the renewal: one EXPIRE per key,
in a script per block and node, the round trips the check costs anyway); a pin, a pinned commit
and a touch renew the blocks they name. Worker hot-cache hits need no renewal of their own: a
worker only loads blocks the scheduler's lookup has just found (and renewed), so keeping the
kvstore the one place that renews costs no extra traffic per hot hit. A pin lasts `kv_ttl_s` from
the request's first pin and every block it pins is renewed when pinned, so no pinned block's
bytes expire while the pin holds; the sweep skips pinned blocks too.
"""

from __future__ import annotations

import asyncio
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
    KVShardReply,
    KVShardRequest,
    KVStats,
    KVTouchRequest,
)
from shared.kv.metrics import IndexMetrics
from shared.kv.nodes import RedisNodes
from shared.settings import Settings

log = structlog.get_logger("kvstore")
T = TypeVar("T")
_UNREACHABLE = object()

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
# Eviction reads this many lowest-priority leaves at a time.
EVICTION_WINDOW = 64
# stats counter that each reason for dropping a block increments
DROP_COUNTERS = {"budget": "evictions", "ttl": "expired", "lost": "lost"}
# How long an unpinned request refuses new pins: a worker's commit sent while the request still
# ran arrives well within this, and must not pin blocks that no unpin would ever release.
RELEASED_TTL_S = 60
# A shard's reservation is forgotten this long after its keys expired (kv_shard_ttl_s after its
# last increment): its worker died without releasing it.
SHARD_GRACE_S = 60
# EXPIRE every key (all layers of one block on one node); returns how many existed. A lookup's
# check that a block's bytes are all there and the renewal of their TTL, in one command.
RENEW_SCRIPT = """
local renewed = 0
for _, key in ipairs(KEYS) do renewed = renewed + redis.call('EXPIRE', key, ARGV[1]) end
return renewed
"""


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


def eviction_priority(last_access: float, importance: float, weight_s: float) -> float:
    """Lower goes first: each unit of attention mass counts as `weight_s` seconds of recency."""
    return last_access + weight_s * importance


def split_bytes(total: int, parts: int) -> list[int]:
    """Spread `total` bytes over `parts` blocks as evenly as integers allow."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# EXPIRE ... NX (set a TTL only on a key that has none) for Redis before 7.0, which lacks NX.
EXPIRE_IF_PERSISTENT = "if redis.call('TTL', KEYS[1]) == -1 then return redis.call('EXPIRE', KEYS[1], ARGV[1]) end return 0"


class KVStoreService:
    def __init__(self, settings: Settings, meter: Meter | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.nodes = RedisNodes.from_settings(settings, decode_responses=True)
        self.metrics = IndexMetrics(meter)
        self.clock = clock
        self._renew_script = [client.register_script(RENEW_SCRIPT) for client in self.nodes.clients]
        # Whatever adds bytes (commit, shard reservation) or evicts runs under this lock: a
        # decision on room is not undone by another one of this replica in between.
        self._budget = asyncio.Lock()

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

        # Their bytes must all be there; checking renews their TTL (blocks in use stay alive).
        present = await self._renew_keys(
            [block_keys(req.model_id, req.quant, h, req.num_layers) for h in req.hashes[:indexed]])
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
        """The worker has written all layers of these blocks: make room for them in the budget,
        index the leading ones that fit, and pin them to `request_id` if given."""
        if not req.blocks:
            return KVCommitReply()
        blocks = sorted(req.blocks, key=lambda b: b.index)  # parents before children
        members = [member(req.quant, b.chain_hash) for b in blocks]
        sizes = split_bytes(req.nbytes, len(blocks))
        async with self._budget:
            reply, kept = await self._commit(req, blocks, members, sizes)
            # Pinned before the lock is let go: no other commit or shard may evict them first.
            pinned = bool(req.request_id and kept) and await self._pin(req.request_id, kept)
        if pinned:
            # Written moments ago, but the pin may outlast that: renewed after pinning, no pinned
            # block expires before its pin does.
            await self._renew_keys([block_keys(req.model_id, req.quant, b.chain_hash, req.num_layers)
                                    for b, m in zip(blocks, members) if m in kept])
        return reply

    async def _commit(
        self, req: KVCommitRequest, blocks: list, members: list[str], sizes: list[int]
    ) -> tuple[KVCommitReply, list[str]]:
        """(the reply, the members now stored: new ones kept and ones stored before)."""
        async def claim(r: Redis):
            # HSETNX claims a block exactly once, even when two workers (or replicas) commit it together.
            pipe = r.pipeline(transaction=False)
            for m, size in zip(members, sizes):
                pipe.hsetnx(BYTES, m, size)
            return await pipe.execute()

        claimed = await self._meta(claim)
        if claimed is None:
            return KVCommitReply(error="kv metadata store unavailable"), []
        new = [(b, m, size) for b, m, size, c in zip(blocks, members, sizes, claimed) if c]
        parents = {member(req.quant, b.parent_hash) for b, _, _ in new if b.parent_hash}
        # Room first; the blocks of this commit and their parents stay (evicting a parent would
        # strand its new child).
        evicted, _ = await self._evict(sum(size for _, _, size in new), protect=set(members) | parents)
        used = await self._used()
        if used is None:
            await self._reject(req, new, count=False)
            return KVCommitReply(error="kv metadata store unavailable"), []
        room, fit = self.settings.kv_budget_bytes - used, 0
        for _, _, size in new:  # chain order: a block whose parent did not fit could never be reached
            if size > room:
                break
            room -= size
            fit += 1
        new, rejected = new[:fit], new[fit:]
        parent_exists = await self._meta(lambda r: _exists_in_hash(r, BYTES, parents), {})
        now = self.clock()

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
        if rejected:
            log.warning("kv_commit_rejected", blocks=len(rejected), budget=self.settings.kv_budget_bytes, used=used)
            await self._reject(req, rejected)
        stored_before = [m for m, c in zip(members, claimed) if not c]
        await self._mark_accessed(stored_before)
        kept = [m for _, m, _ in new] + stored_before
        return KVCommitReply(stored=len(new), evicted=evicted, rejected=len(rejected)), kept

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
        await self._renew_members([m for m, _ in known])  # used: alive for the TTL from now, like the index says
        return KVAck(ok=bool(ok))

    async def pin(self, req: KVPinRequest) -> KVAck:
        if req.action == "unpin":

            async def unpin(r: Redis):
                pipe = r.pipeline(transaction=True)
                # Remembered a while: a worker's commit still on its way must not pin again.
                pipe.set(released_key(req.request_id), 1, ex=RELEASED_TTL_S)
                pipe.delete(pins_key(req.request_id))
                pipe.zrem(PINNED_REQUESTS, req.request_id)
                return await pipe.execute()

            ok = await self._meta(unpin)
            await self.evict_to_budget()  # what the request held may have kept the store over budget
            return KVAck(ok=ok is not None)
        members = [member(req.quant, h) for h in req.hashes]
        ok = await self._pin(req.request_id, members)
        if ok:
            await self._renew_members(members)  # after pinning: the bytes outlive the pin
        return KVAck(ok=ok)

    async def shard(self, req: KVShardRequest) -> KVShardReply:
        """Room in the budget for a decode shard's next increment, or the shard's release."""
        key = shard_member(req.request_id, req.member)
        if req.action == "release":
            released = await self._release_shard(key)
            return KVShardReply(granted=True) if released is not None else KVShardReply(
                error="kv metadata store unavailable")
        async with self._budget:
            _, fits = await self._evict(req.nbytes)
            if not fits:
                await self._meta(lambda r: r.hincrby(STATS, "shard_refusals", 1))
                return KVShardReply(granted=False)
            now = self.clock()

            async def reserve(r: Redis):
                pipe = r.pipeline(transaction=True)
                pipe.hincrby(SHARDS, key, req.nbytes)
                pipe.zadd(SHARDS_SEEN, {key: now})
                pipe.hincrby(STATS, "shard_bytes", req.nbytes)
                await pipe.execute()
                return True

            if not await self._meta(reserve, False):
                return KVShardReply(error="kv metadata store unavailable")
        return KVShardReply(granted=True)

    async def stats(self) -> KVStats:
        counters = await self._meta(lambda r: r.hgetall(STATS))
        shards = await self._meta(lambda r: r.hlen(SHARDS))
        pinned = await self._pinned()
        if counters is None or shards is None or pinned is None:
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
            rejected=c.get("rejected", 0),
            expired=c.get("expired", 0),
            lost=c.get("lost", 0),
            pinned_blocks=len(blocks),
            pinned_requests=requests,
            shard_bytes=c.get("shard_bytes", 0),
            shards=shards,
            shard_refusals=c.get("shard_refusals", 0),
        )

    # ---- budget and TTL ---------------------------------------------------------------------

    async def evict_to_budget(self) -> int:
        """Drop unpinned leaves, lowest priority first, until blocks and shards fit the budget."""
        async with self._budget:
            evicted, fits = await self._evict()
        if not fits:
            log.warning("kv_over_budget_all_pinned", budget=self.settings.kv_budget_bytes)
        return evicted

    async def sweep_expired(self) -> int:
        """Drop every unpinned block not accessed within the TTL; the bytes carry the same TTL in Redis."""
        cutoff = self.clock() - self.settings.kv_ttl_s
        old = await self._meta(lambda r: r.zrangebyscore(ACCESS, "-inf", cutoff), [])
        pinned = await self._pinned()  # read after `old`: a block pinned since is in it
        if not old or pinned is None:
            return 0
        dropped = 0
        for m in old:
            if m in pinned[1]:
                continue
            # Still unused? A lookup may have hit it since (and a pin may follow).
            access = await self._meta(lambda r, m=m: r.zscore(ACCESS, m))
            if access is not None and access <= cutoff and await self._drop(m, "ttl") is not None:
                dropped += 1
        return dropped

    async def forget_stale_shards(self) -> int:
        """Release the reservations of shards whose keys have expired (their worker never released them)."""
        cutoff = self.clock() - self.settings.kv_shard_ttl_s - SHARD_GRACE_S
        stale = await self._meta(lambda r: r.zrangebyscore(SHARDS_SEEN, "-inf", cutoff), [])
        forgotten = 0
        for key in stale or []:
            forgotten += bool(await self._release_shard(key))
        return forgotten

    # ---- internals --------------------------------------------------------------------------

    async def _renew_keys(self, blocks: Sequence[list[str]]) -> list[bool]:
        """Renew the TTL of every key of each block (its layers' keys); whether all of them existed.
        One script call per block and node: the same round trips and commands an EXISTS check takes."""
        ttl = self.settings.kv_ttl_s
        per_node: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)
        for i, keys in enumerate(blocks):
            keys_by_node: dict[int, list[str]] = defaultdict(list)
            for key in keys:
                keys_by_node[self.nodes.node_for(key)].append(key)
            for node, node_keys in keys_by_node.items():
                per_node[node].append((i, node_keys))
        present = [True] * len(blocks)
        for node, checks in per_node.items():
            script = self._renew_script[node]

            async def renew(r: Redis, checks=checks, script=script):
                pipe = r.pipeline(transaction=False)
                for _, keys in checks:
                    await script(keys=keys, args=[ttl], client=pipe)
                return await pipe.execute()

            counts = await self.nodes.call(node, renew, None)
            for (i, keys), count in zip(checks, counts or [0] * len(checks)):
                present[i] = present[i] and count == len(keys)
        return present

    async def _renew_members(self, members: Sequence[str]) -> None:
        """Renew the bytes' TTL of these indexed blocks (unknown ones are left alone)."""
        if not members:
            return

        async def read(r: Redis):
            pipe = r.pipeline(transaction=False)
            for m in members:
                pipe.hmget(block_meta_key(m), "model", "quant", "hash", "layers")
            return await pipe.execute()

        infos = await self._meta(read, [])
        await self._renew_keys([block_keys(model, quant, h, int(layers))
                                for model, quant, h, layers in infos or [] if model is not None])

    async def _used(self) -> int | None:
        """Bytes counted against the budget: prefix blocks and shards."""
        counters = await self._meta(lambda r: r.hmget(STATS, "bytes", "shard_bytes"))
        return None if counters is None else sum(int(c or 0) for c in counters)

    async def _evict(self, need: int = 0, protect: set[str] = frozenset()) -> tuple[int, bool]:
        """Drop unpinned, unprotected leaves, lowest priority first, until what is stored plus
        `need` fits the budget; (blocks evicted, whether it fits). Call under the budget lock."""
        used = await self._used()
        if used is None:
            return 0, False
        if used + need <= self.settings.kv_budget_bytes:
            return 0, True  # the common case: no need to read the pins
        pinned = await self._pinned()
        if pinned is None:
            return 0, False
        keep = pinned[1] | protect
        evicted, offset = 0, 0
        while True:
            used = await self._used()
            if used is None:
                return evicted, False
            if used + need <= self.settings.kv_budget_bytes:
                return evicted, True
            window = await self._meta(lambda r: r.zrange(LEAVES, offset, offset + EVICTION_WINDOW - 1), [])
            if not window:
                return evicted, False
            victim = next((m for m in window if m not in keep), None)
            if victim is None:
                offset += len(window)
                continue
            if await self._drop(victim, "budget") is None:
                return evicted, False
            evicted, offset = evicted + 1, 0

    async def _reject(self, req: KVCommitRequest, rejected: list, count: bool = True) -> None:
        """Committed blocks that are not kept: give their claims back and delete their bytes."""
        if not rejected:
            return
        for b, _, _ in rejected:
            await self._delete_bytes(req.model_id, req.quant, b.chain_hash, req.num_layers)

        async def unclaim(r: Redis):
            pipe = r.pipeline(transaction=True)
            pipe.hdel(BYTES, *[m for _, m, _ in rejected])
            if count:
                pipe.hincrby(STATS, "rejected", len(rejected))
            await pipe.execute()

        await self._meta(unclaim)
        if count:
            self.metrics.evictions.add(len(rejected), {"reason": "rejected"})

    async def _release_shard(self, key: str) -> int | None:
        """Forget one shard's reservation; the bytes it held, None if Redis is unreachable."""

        async def release(r: Redis):
            pipe = r.pipeline(transaction=True)
            pipe.hget(SHARDS, key)
            pipe.hdel(SHARDS, key)
            pipe.zrem(SHARDS_SEEN, key)
            size, removed, _ = await pipe.execute()
            if removed:  # exactly one of several releases (a worker's and the sweep's) counts it
                await r.hincrby(STATS, "shard_bytes", -int(size or 0))
            return int(size or 0) if removed else 0

        return await self._meta(release)

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
        """Pin `members` for the request; False if it has unpinned already (or Redis is unreachable)."""
        ttl = self.settings.kv_ttl_s
        now = self.clock()

        async def pin(r: Redis):
            pipe = r.pipeline(transaction=True)
            if members:
                pipe.sadd(pins_key(request_id), *members)
            # A request that never unpins (its worker died) stops pinning after the TTL, counted from
            # its first pin: each block it pins is renewed when pinned, so outlives the pin.
            pipe.eval(EXPIRE_IF_PERSISTENT, 1, pins_key(request_id), ttl)
            pipe.zremrangebyscore(PINNED_REQUESTS, "-inf", now - ttl)
            pipe.zadd(PINNED_REQUESTS, {request_id: now}, nx=True)
            pipe.exists(released_key(request_id))
            *_, released = await pipe.execute()
            if released:  # the request ended before this pin arrived: take it back
                pipe = r.pipeline(transaction=True)
                pipe.delete(pins_key(request_id))
                pipe.zrem(PINNED_REQUESTS, request_id)
                await pipe.execute()
                return False
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
                return None  # another drop (a replica's, the sweep's) got it
            size, quant = int(size or 0), block.split(":", 1)[0]
            pipe = r.pipeline(transaction=True)
            for field, amount in (("bytes", -size), (f"bytes:{quant}", -size), ("blocks", -1),
                                  (f"blocks:{quant}", -1), (DROP_COUNTERS[reason], 1)):
                pipe.hincrby(STATS, field, amount)
            await pipe.execute()
            self.metrics.evictions.add(1, {"reason": reason})
            return size

        gone = await self._meta(forget, _UNREACHABLE)
        if gone is _UNREACHABLE:
            return None
        parent = info.get("parent") if info else None
        if gone is not None and parent:  # only the drop that removed it tells the parent
            await self._meta(lambda r: self._child_gone(r, parent))
        return gone or 0

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
