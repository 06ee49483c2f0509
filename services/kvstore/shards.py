"""Decode shards in the KV budget: a worker reserves room for each shard increment before it writes
it (shared/kv/shards.py), and releases the reservation when it deletes the shard. Shards are never
evicted; the sweep forgets the reservations of shards whose keys have expired (a dead worker).
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.kvstore.budget import Budget
from services.kvstore.keyspace import META_UNAVAILABLE, SHARDS, SHARDS_SEEN, STATS, MetadataStore, shard_member
from shared.kv.messages import KVShardReply, KVShardRequest

# A shard's reservation is forgotten this long after its keys expired (kv_shard_ttl_s after its
# last increment): its worker died without releasing it.
SHARD_GRACE_S = 60


class Shards:
    def __init__(self, store: MetadataStore, budget: Budget):
        self.store = store
        self.budget = budget

    async def request(self, req: KVShardRequest) -> KVShardReply:
        """Room in the budget for a decode shard's next increment, or the shard's release."""
        key = shard_member(req.request_id, req.member)
        if req.action == "release":
            released = await self._release(key)
            return KVShardReply(granted=True) if released is not None else KVShardReply(error=META_UNAVAILABLE)
        async with self.budget.lock:
            _, fits = await self.budget.evict(req.nbytes)
            if not fits:
                await self.store.meta(lambda r: r.hincrby(STATS, "shard_refusals", 1))
                return KVShardReply(granted=False)
            now = self.store.clock()

            async def reserve(r: Redis):
                pipe = r.pipeline(transaction=True)
                pipe.hincrby(SHARDS, key, req.nbytes)
                pipe.zadd(SHARDS_SEEN, {key: now})
                pipe.hincrby(STATS, "shard_bytes", req.nbytes)
                await pipe.execute()
                return True

            if not await self.store.meta(reserve, False):
                return KVShardReply(error=META_UNAVAILABLE)
        return KVShardReply(granted=True)

    async def count(self) -> int | None:
        """How many shards hold a reservation; None if Redis is unreachable."""
        return await self.store.meta(lambda r: r.hlen(SHARDS))

    async def forget_stale(self) -> int:
        """Release the reservations of shards whose keys have expired (their worker never released them)."""
        cutoff = self.store.clock() - self.store.settings.kv_shard_ttl_s - SHARD_GRACE_S
        stale = await self.store.meta(lambda r: r.zrangebyscore(SHARDS_SEEN, "-inf", cutoff), [])
        forgotten = 0
        for key in stale or []:
            forgotten += bool(await self._release(key))
        return forgotten

    async def _release(self, key: str) -> int | None:
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

        return await self.store.meta(release)
