"""The block index: which blocks are stored, their recency and attention mass, their bytes' TTL,
and claiming, indexing and dropping them.

**TTL.** Block bytes expire `kv_ttl_s` after their last use: a write sets it; a lookup renews it
for the blocks it finds (the check that their bytes exist *is* the renewal: one EXPIRE per key,
in a script per block and node, the round trips the check costs anyway); a pin, a pinned commit
and a touch renew the blocks they name. Worker hot-cache hits need no renewal of their own: a
worker only loads blocks the scheduler's lookup has just found (and renewed), so keeping the
kvstore the one place that renews costs no extra traffic per hot hit. The sweep drops blocks
unused for the TTL, but never a pinned one (pins.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import structlog
from redis.asyncio import Redis

from services.kvstore.budget import eviction_priority
from services.kvstore.keyspace import (
    ACCESS,
    BYTES,
    IMPORTANCE,
    LEAVES,
    META_UNAVAILABLE,
    STATS,
    MetadataStore,
    block_keys,
    block_meta_key,
    member,
)
from services.kvstore.pins import Pins
from shared.kv.messages import KVAck, KVCommitBlock, KVCommitRequest, KVLookupReply, KVLookupRequest, KVTouchRequest

log = structlog.get_logger("kvstore")
_UNREACHABLE = object()
# A block a commit has claimed: (the block, its member, its bytes).
NewBlock = tuple[KVCommitBlock, str, int]
# stats counter that each reason for dropping a block increments
DROP_COUNTERS = {"budget": "evictions", "ttl": "expired", "lost": "lost"}
# EXPIRE every key (all layers of one block on one node); returns how many existed. A lookup's
# check that a block's bytes are all there and the renewal of their TTL, in one command.
RENEW_SCRIPT = """
local renewed = 0
for _, key in ipairs(KEYS) do renewed = renewed + redis.call('EXPIRE', key, ARGV[1]) end
return renewed
"""


class BlockIndex:
    def __init__(self, store: MetadataStore):
        self.store = store
        self._renew_script = [client.register_script(RENEW_SCRIPT) for client in store.nodes.clients]

    def _priority(self, last_access: float, importance: float) -> float:
        return eviction_priority(last_access, importance, self.store.settings.kv_importance_weight_s)

    async def lookup(self, req: KVLookupRequest) -> KVLookupReply:
        """How many leading blocks are stored for all `num_layers` layers (their bytes checked)."""
        members = [member(req.quant, h) for h in req.hashes]

        async def layers_of(r: Redis):
            pipe = r.pipeline(transaction=False)
            for m in members:
                pipe.hget(block_meta_key(m), "layers")
            return await pipe.execute()

        layers = await self.store.meta(layers_of)
        if layers is None:
            return KVLookupReply(blocks=0)
        indexed = 0
        for stored_layers in layers:
            if stored_layers is None or int(stored_layers) < req.num_layers:
                break
            indexed += 1

        # Their bytes must all be there; checking renews their TTL (blocks in use stay alive).
        present = await self.renew_keys(
            [block_keys(req.model_id, req.quant, h, req.num_layers) for h in req.hashes[:indexed]])
        hits = next((i for i, ok in enumerate(present) if not ok), indexed)
        if hits < indexed:
            # The index must stop claiming a block whose bytes are gone (Redis restarted, key expired).
            await self.drop(members[hits], "lost")
        await self.mark_accessed(members[:hits])
        misses = len(members) - hits

        async def count(r: Redis):
            pipe = r.pipeline(transaction=False)
            pipe.hincrby(STATS, "hits", hits)
            pipe.hincrby(STATS, "misses", misses)
            await pipe.execute()

        await self.store.meta(count)
        self.store.metrics.lookup(hits, misses)
        return KVLookupReply(blocks=hits)

    async def touch(self, req: KVTouchRequest) -> KVAck:
        """Blocks were attended to: refresh their access time and add their attention mass."""
        members = [member(req.quant, t.chain_hash) for t in req.touches]
        if not members:
            return KVAck(ok=True)
        indexed = await self.store.meta(lambda r: r.zmscore(ACCESS, members))
        if indexed is None:
            return KVAck(ok=False, error=META_UNAVAILABLE)
        known = [(m, t.importance) for m, t, score in zip(members, req.touches, indexed) if score is not None]
        now = self.store.clock()

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

        ok = await self.store.meta(add_importance, False) if known else True
        await self.renew_members([m for m, _ in known])  # used: alive for the TTL from now, like the index says
        return KVAck(ok=bool(ok))

    # ---- a commit's steps (the service puts them together under the budget lock) --------------

    async def claim(self, members: list[str], sizes: list[int]) -> list[bool] | None:
        """Claim each block's bytes; whether each was new, None if Redis is unreachable."""

        async def claim(r: Redis):
            # HSETNX claims a block exactly once, even when two workers (or replicas) commit it together.
            pipe = r.pipeline(transaction=False)
            for m, size in zip(members, sizes):
                pipe.hsetnx(BYTES, m, size)
            return await pipe.execute()

        return await self.store.meta(claim)

    async def index(self, req: KVCommitRequest, new: list[NewBlock], parents: set[str]) -> None:
        """Index claimed blocks as leaves; a stored parent of one stops being a leaf."""
        parent_exists = await self.store.meta(lambda r: _exists_in_hash(r, BYTES, parents), {})
        now = self.store.clock()

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

        await self.store.meta(index)

    async def reject(self, req: KVCommitRequest, rejected: list[NewBlock], count: bool = True) -> None:
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

        await self.store.meta(unclaim)
        if count:
            self.store.metrics.evictions.add(len(rejected), {"reason": "rejected"})

    # ---- recency and TTL --------------------------------------------------------------------

    async def mark_accessed(self, members: list[str]) -> None:
        if not members:
            return
        now = self.store.clock()

        async def mark(r: Redis):
            importance = await r.zmscore(IMPORTANCE, members)
            pipe = r.pipeline(transaction=False)
            for m, imp in zip(members, importance):
                pipe.zadd(ACCESS, {m: now}, xx=True)
                pipe.zadd(LEAVES, {m: self._priority(now, imp or 0.0)}, xx=True)
            await pipe.execute()

        await self.store.meta(mark)

    async def renew_keys(self, blocks: Sequence[list[str]]) -> list[bool]:
        """Renew the TTL of every key of each block (its layers' keys); whether all of them existed.
        One script call per block and node: the same round trips and commands an EXISTS check takes."""
        ttl = self.store.settings.kv_ttl_s
        per_node: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)
        for i, keys in enumerate(blocks):
            for node, node_keys in self._by_node(keys).items():
                per_node[node].append((i, node_keys))
        present = [True] * len(blocks)
        for node, checks in per_node.items():
            script = self._renew_script[node]

            async def renew(r: Redis, checks=checks, script=script):
                pipe = r.pipeline(transaction=False)
                for _, keys in checks:
                    await script(keys=keys, args=[ttl], client=pipe)
                return await pipe.execute()

            counts = await self.store.nodes.call(node, renew, None)
            for (i, keys), count in zip(checks, counts or [0] * len(checks)):
                present[i] = present[i] and count == len(keys)
        return present

    async def renew_members(self, members: Sequence[str]) -> None:
        """Renew the bytes' TTL of these indexed blocks (unknown ones are left alone)."""
        if not members:
            return

        async def read(r: Redis):
            pipe = r.pipeline(transaction=False)
            for m in members:
                pipe.hmget(block_meta_key(m), "model", "quant", "hash", "layers")
            return await pipe.execute()

        infos = await self.store.meta(read, [])
        await self.renew_keys([block_keys(model, quant, h, int(layers))
                               for model, quant, h, layers in infos or [] if model is not None])

    async def sweep_expired(self, pins: Pins) -> int:
        """Drop every unpinned block not accessed within the TTL; the bytes carry the same TTL in Redis."""
        cutoff = self.store.clock() - self.store.settings.kv_ttl_s
        old = await self.store.meta(lambda r: r.zrangebyscore(ACCESS, "-inf", cutoff), [])
        pinned = await pins.pinned()  # read after `old`: a block pinned since is in it
        if not old or pinned is None:
            return 0
        dropped = 0
        for m in old:
            if m in pinned[1]:
                continue
            # Still unused? A lookup may have hit it since (and a pin may follow).
            access = await self.store.meta(lambda r, m=m: r.zscore(ACCESS, m))
            if access is not None and access <= cutoff and await self.drop(m, "ttl") is not None:
                dropped += 1
        return dropped

    # ---- dropping ---------------------------------------------------------------------------

    async def drop(self, block: str, reason: str) -> int | None:
        """Remove one block (bytes and metadata); returns the bytes freed, None if Redis is unreachable."""
        info = await self.store.meta(lambda r: r.hgetall(block_meta_key(block)))
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
            self.store.metrics.evictions.add(1, {"reason": reason})
            return size

        gone = await self.store.meta(forget, _UNREACHABLE)
        if gone is _UNREACHABLE:
            return None
        parent = info.get("parent") if info else None
        if gone is not None and parent:  # only the drop that removed it tells the parent
            await self.store.meta(lambda r: self._child_gone(r, parent))
        return gone or 0

    async def _child_gone(self, r: Redis, parent: str) -> None:
        """A parent whose last stored child went becomes a leaf: evictable again."""
        if not await r.hexists(BYTES, parent):
            return
        children = await r.hincrby(block_meta_key(parent), "children", -1)
        if children <= 0:
            access, importance = await r.zmscore(ACCESS, [parent]), await r.zmscore(IMPORTANCE, [parent])
            await r.zadd(LEAVES, {parent: self._priority(access[0] or self.store.clock(), importance[0] or 0.0)})

    async def _delete_bytes(self, model_id: str, quant: str, chain_hash: str, num_layers: int) -> None:
        for node, keys in self._by_node(block_keys(model_id, quant, chain_hash, num_layers)).items():
            await self.store.nodes.call(node, lambda r, keys=keys: r.delete(*keys), 0)

    def _by_node(self, keys: list[str]) -> dict[int, list[str]]:
        """`keys` grouped by the Redis node that holds each (in their order)."""
        by_node: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            by_node[self.store.nodes.node_for(key)].append(key)
        return by_node


async def _exists_in_hash(r: Redis, key: str, fields: set[str]) -> dict[str, bool]:
    if not fields:
        return {}
    names = sorted(fields)
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hexists(key, name)
    return dict(zip(names, await pipe.execute()))
