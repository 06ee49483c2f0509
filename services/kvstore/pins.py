"""Pins: the blocks an in-flight request holds, which neither eviction nor the TTL sweep drops.

A pin lasts `kv_ttl_s` from the request's first pin (a request that never unpins, its worker
dead, stops pinning then), and every block it pins is renewed when pinned, so no pinned block's
bytes expire while the pin holds. A request that has unpinned refuses new pins for a while: a
worker's commit sent while it still ran must not pin blocks that no unpin would ever release.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.kvstore.keyspace import PINNED_REQUESTS, MetadataStore, pins_key, released_key

# How long an unpinned request refuses new pins: a worker's commit sent while the request still
# ran arrives well within this, and must not pin blocks that no unpin would ever release.
RELEASED_TTL_S = 60
# EXPIRE ... NX (set a TTL only on a key that has none) for Redis before 7.0, which lacks NX.
EXPIRE_IF_PERSISTENT = "if redis.call('TTL', KEYS[1]) == -1 then return redis.call('EXPIRE', KEYS[1], ARGV[1]) end return 0"


class Pins:
    def __init__(self, store: MetadataStore):
        self.store = store

    async def pin(self, request_id: str, members: list[str]) -> bool:
        """Pin `members` for the request; False if it has unpinned already (or Redis is unreachable)."""
        ttl = self.store.settings.kv_ttl_s
        now = self.store.clock()

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

        return bool(await self.store.meta(pin, False))

    async def unpin(self, request_id: str) -> bool:
        """Release every pin of the request, and refuse its late ones; False if Redis is unreachable."""

        async def unpin(r: Redis):
            pipe = r.pipeline(transaction=True)
            # Remembered a while: a worker's commit still on its way must not pin again.
            pipe.set(released_key(request_id), 1, ex=RELEASED_TTL_S)
            pipe.delete(pins_key(request_id))
            pipe.zrem(PINNED_REQUESTS, request_id)
            return await pipe.execute()

        return await self.store.meta(unpin) is not None

    async def pinned(self) -> tuple[int, set[str]] | None:
        """(live pinning requests, the members they pin), forgetting requests older than the TTL."""

        async def read(r: Redis):
            await r.zremrangebyscore(PINNED_REQUESTS, "-inf", self.store.clock() - self.store.settings.kv_ttl_s)
            requests = await r.zrange(PINNED_REQUESTS, 0, -1)
            blocks = await r.sunion(*[pins_key(q) for q in requests]) if requests else set()
            return len(requests), set(blocks)

        return await self.store.meta(read)
