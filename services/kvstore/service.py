"""The kvstore service's logic: the metadata of stored KV blocks, in Redis, shared by replicas.

A thin facade over the parts, one concern each; a commit, the one request that needs them all,
is put together here:

    keyspace.py  the Redis keys of blocks, pins and shards, and the metadata node they live on
    blocks.py    the block index: lookup, recency and attention mass, TTL renewal and expiry, drops
    budget.py    the budget over blocks and decode shards, and the order eviction takes
    pins.py      the blocks in-flight requests hold
    shards.py    decode shards' reservations in the budget
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from opentelemetry.metrics import Meter

from services.kvstore.blocks import BlockIndex, NewBlock
from services.kvstore.budget import Budget, leading_that_fit, split_bytes
from services.kvstore.keyspace import META_UNAVAILABLE, STATS, MetadataStore, block_keys, member
from services.kvstore.pins import Pins
from services.kvstore.shards import Shards
from shared.kv.messages import (
    KVAck,
    KVCommitBlock,
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
from shared.settings import Settings

log = structlog.get_logger("kvstore")


class KVStoreService:
    def __init__(self, settings: Settings, meter: Meter | None = None, clock: Callable[[], float] = time.time):
        self.store = MetadataStore(settings, meter, clock)
        self.pins = Pins(self.store)
        self.blocks = BlockIndex(self.store)
        self.budget = Budget(self.store, self.blocks, self.pins)
        self.shards = Shards(self.store, self.budget)

    @property
    def settings(self) -> Settings:
        return self.store.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self.store.settings = settings  # every part reads them from the store, at each call

    # ---- requests ---------------------------------------------------------------------------

    async def lookup(self, req: KVLookupRequest) -> KVLookupReply:
        """How many leading blocks are stored for all `num_layers` layers (their bytes checked)."""
        return await self.blocks.lookup(req)

    async def commit(self, req: KVCommitRequest) -> KVCommitReply:
        """The worker has written all layers of these blocks: make room for them in the budget,
        index the leading ones that fit, and pin them to `request_id` if given."""
        if not req.blocks:
            return KVCommitReply()
        blocks = sorted(req.blocks, key=lambda b: b.index)  # parents before children
        members = [member(req.quant, b.chain_hash) for b in blocks]
        sizes = split_bytes(req.nbytes, len(blocks))
        async with self.budget.lock:
            reply, kept = await self._commit(req, blocks, members, sizes)
            # Pinned before the lock is let go: no other commit or shard may evict them first.
            pinned = bool(req.request_id and kept) and await self.pins.pin(req.request_id, kept)
        if pinned:
            # Written moments ago, but the pin may outlast that: renewed after pinning, no pinned
            # block expires before its pin does.
            await self.blocks.renew_keys([block_keys(req.model_id, req.quant, b.chain_hash, req.num_layers)
                                          for b, m in zip(blocks, members) if m in kept])
        return reply

    async def _commit(
        self, req: KVCommitRequest, blocks: list[KVCommitBlock], members: list[str], sizes: list[int]
    ) -> tuple[KVCommitReply, list[str]]:
        """(the reply, the members now stored: new ones kept and ones stored before)."""
        claimed = await self.blocks.claim(members, sizes)
        if claimed is None:
            return KVCommitReply(error=META_UNAVAILABLE), []
        new: list[NewBlock] = [(b, m, size) for b, m, size, c in zip(blocks, members, sizes, claimed) if c]
        parents = {member(req.quant, b.parent_hash) for b, _, _ in new if b.parent_hash}
        # Room first; the blocks of this commit and their parents stay (evicting a parent would
        # strand its new child).
        evicted, _ = await self.budget.evict(sum(size for _, _, size in new), protect=set(members) | parents)
        used = await self.budget.used()
        if used is None:
            await self.blocks.reject(req, new, count=False)
            return KVCommitReply(error=META_UNAVAILABLE), []
        fit = leading_that_fit([size for _, _, size in new], self.budget.limit - used)
        new, rejected = new[:fit], new[fit:]
        await self.blocks.index(req, new, parents)
        if rejected:
            log.warning("kv_commit_rejected", blocks=len(rejected), budget=self.budget.limit, used=used)
            await self.blocks.reject(req, rejected)
        stored_before = [m for m, c in zip(members, claimed) if not c]
        await self.blocks.mark_accessed(stored_before)
        kept = [m for _, m, _ in new] + stored_before
        return KVCommitReply(stored=len(new), evicted=evicted, rejected=len(rejected)), kept

    async def touch(self, req: KVTouchRequest) -> KVAck:
        """Blocks were attended to: refresh their access time and add their attention mass."""
        return await self.blocks.touch(req)

    async def pin(self, req: KVPinRequest) -> KVAck:
        if req.action == "unpin":
            ok = await self.pins.unpin(req.request_id)
            await self.evict_to_budget()  # what the request held may have kept the store over budget
            return KVAck(ok=ok)
        members = [member(req.quant, h) for h in req.hashes]
        ok = await self.pins.pin(req.request_id, members)
        if ok:
            await self.blocks.renew_members(members)  # after pinning: the bytes outlive the pin
        return KVAck(ok=ok)

    async def shard(self, req: KVShardRequest) -> KVShardReply:
        """Room in the budget for a decode shard's next increment, or the shard's release."""
        return await self.shards.request(req)

    async def stats(self) -> KVStats:
        counters = await self.store.meta(lambda r: r.hgetall(STATS))
        shards = await self.shards.count()
        pinned = await self.pins.pinned()
        if counters is None or shards is None or pinned is None:
            return KVStats(error=META_UNAVAILABLE, budget_bytes=self.budget.limit, budget_source=self.budget.choice.source)
        requests, blocks = pinned
        c = {k: int(v) for k, v in counters.items()}
        hits, misses = c.get("hits", 0), c.get("misses", 0)
        bytes_by_quant = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("bytes:") and v}
        blocks_by_quant = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("blocks:") and v}
        hit_rate = hits / (hits + misses) if hits + misses else None
        self.store.metrics.stored(bytes_by_quant, blocks_by_quant, hit_rate)
        return KVStats(
            blocks=c.get("blocks", 0),
            bytes_stored=c.get("bytes", 0),
            budget_bytes=self.budget.limit,
            budget_source=self.budget.choice.source,
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

    # ---- the sweep's (services/kvstore/main.py) ---------------------------------------------

    async def refresh_budget(self) -> None:
        """Derive the budget from the Redis nodes' memory again (when it is not set explicitly)."""
        await self.budget.refresh()

    async def evict_to_budget(self) -> int:
        """Drop unpinned leaves, lowest priority first, until blocks and shards fit the budget."""
        return await self.budget.evict_to_budget()

    async def sweep_expired(self) -> int:
        """Drop every unpinned block not accessed within the TTL."""
        return await self.blocks.sweep_expired(self.pins)

    async def forget_stale_shards(self) -> int:
        """Release the reservations of shards whose keys have expired (their worker never released them)."""
        return await self.shards.forget_stale()

    async def close(self) -> None:
        await self.store.close()
