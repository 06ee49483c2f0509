"""The KV budget and eviction: what counts against the budget, and which block leaves first.

**Budget.** The budget (`kv_budget_bytes`, or derived from the Redis nodes' memory when that is
not set: derived_budget.py) bounds the prefix blocks *and* the decode shards of requests in
flight (shared/kv/shards.py) together. Room is made before anything is added: a commit evicts
unpinned leaves for its new blocks and keeps only the leading ones that fit (the rest's bytes
are deleted, `rejected`); a worker reserves room for each shard increment before writing it
(shards.py), and is refused when even evicting every unpinned block would not make room. Shards
are never evicted (they are what a restore needs). Decisions are serialized within a replica
(`Budget.lock`), so the counters never exceed the budget; replicas can overshoot by what they
add at the same moment, which the next eviction takes back.

**Eviction** takes the unpinned *leaf* with the lowest priority = last access + weight * importance,
so a chain shrinks from its tail (without block i, blocks i+1.. could never be reached) and, of
two blocks used at the same time, the one that drew more attention stays longer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from services.kvstore.derived_budget import BudgetChoice, DerivedBudget
from services.kvstore.keyspace import LEAVES, STATS, MetadataStore
from services.kvstore.pins import Pins

if TYPE_CHECKING:  # blocks.py orders its leaves by eviction_priority, from here
    from services.kvstore.blocks import BlockIndex

log = structlog.get_logger("kvstore")
# Eviction reads this many lowest-priority leaves at a time.
EVICTION_WINDOW = 64


def eviction_priority(last_access: float, importance: float, weight_s: float) -> float:
    """Lower goes first: each unit of attention mass counts as `weight_s` seconds of recency."""
    return last_access + weight_s * importance


def split_bytes(total: int, parts: int) -> list[int]:
    """Spread `total` bytes over `parts` blocks as evenly as integers allow."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def leading_that_fit(sizes: Sequence[int], room: int) -> int:
    """How many of `sizes`, taken in chain order, fit in `room` bytes: it stops at the first that
    does not, as a block whose parent did not fit could never be reached."""
    fit = 0
    for size in sizes:
        if size > room:
            break
        room -= size
        fit += 1
    return fit


class Budget:
    def __init__(self, store: MetadataStore, blocks: BlockIndex, pins: Pins):
        self.store = store
        self.blocks = blocks
        self.pins = pins
        # Whatever adds bytes (commit, shard reservation) or evicts runs under this lock: a
        # decision on room is not undone by another one of this replica in between.
        self.lock = asyncio.Lock()
        self.derived = DerivedBudget()

    @property
    def choice(self) -> BudgetChoice:
        """The budget in force and where it came from (the settings are read at each call)."""
        return self.derived.current(self.store.settings)

    @property
    def limit(self) -> int:
        return self.choice.bytes

    async def refresh(self) -> BudgetChoice:
        """Derive the budget from the Redis nodes again (at start and on each sweep)."""
        return await self.derived.refresh(self.store.settings, self.store.nodes)

    async def used(self) -> int | None:
        """Bytes counted against the budget: prefix blocks and shards."""
        counters = await self.store.meta(lambda r: r.hmget(STATS, "bytes", "shard_bytes"))
        return None if counters is None else sum(int(c or 0) for c in counters)

    async def evict(self, need: int = 0, protect: set[str] = frozenset()) -> tuple[int, bool]:
        """Drop unpinned, unprotected leaves, lowest priority first, until what is stored plus
        `need` fits the budget; (blocks evicted, whether it fits). Call under `lock`."""
        used = await self.used()
        if used is None:
            return 0, False
        if used + need <= self.limit:
            return 0, True  # the common case: no need to read the pins
        pinned = await self.pins.pinned()
        if pinned is None:
            return 0, False
        keep = pinned[1] | protect
        evicted, offset = 0, 0
        while True:
            used = await self.used()
            if used is None:
                return evicted, False
            if used + need <= self.limit:
                return evicted, True
            window = await self.store.meta(lambda r: r.zrange(LEAVES, offset, offset + EVICTION_WINDOW - 1), [])
            if not window:
                return evicted, False
            victim = next((m for m in window if m not in keep), None)
            if victim is None:
                offset += len(window)
                continue
            if await self.blocks.drop(victim, "budget") is None:
                return evicted, False
            evicted, offset = evicted + 1, 0

    async def evict_to_budget(self) -> int:
        """Drop unpinned leaves, lowest priority first, until blocks and shards fit the budget."""
        async with self.lock:
            evicted, fits = await self.evict()
        if not fits:
            log.warning("kv_over_budget_all_pinned", budget=self.limit)
        return evicted
