"""Prompt blocks kept in the KV pool after their request ended (issue 10, the device tier): a
later prompt with the same prefix maps those pages into its own block table, no copy, no Redis.

Only blocks a request held whole on one worker, in position order, computed with the model's
own attention (no per-request pattern): there block i of the prompt is page i of the request
(a page is a block: both KV_BLOCK_TOKENS). Blocks are named by their chain hash (the prefix
cache's: the same hash means the same tokens before and in the block, so the same K/V). Pages
are shared by reference counts (KVPool.retain / free): a request mapping them holds them while
it runs, and never writes them (its own rows start after them). Least recently used blocks go
first when the pool needs pages (KVPool.reclaim) or past `max_pages`.

With a host tier (`host_bytes`, host_kv_tier.py), evicted blocks are copied to host memory
first, and a prompt's leading blocks may come from both tiers: those in the pool are mapped,
those in host memory copied back into fresh pages, which then join the device tier.

All calls come from the compute thread, as every use of the pool's pages does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from shared.messages import PromptBlock
from services.worker.host_kv_tier import HostKVTier
from services.worker.kv_cache import KVPool, KVPoolFull

log = structlog.get_logger("worker")


@dataclass(frozen=True)
class TakenBlocks:
    """Where the blocks of the latest `take` came from."""

    pool: int = 0  # mapped: resident in the pool
    host: int = 0  # copied back from the host tier


class ResidentPrefix:
    def __init__(self, pool: KVPool, max_pages: int, host_bytes: int = 0):
        self.pool = pool
        self.max_pages = max_pages
        self._pages: OrderedDict[str, int] = OrderedDict()  # chain hash -> page, least recent first
        self.hits = 0  # blocks found in the pool and mapped into a prefill
        # where evicted blocks go (None: nowhere, their pages are only freed)
        self.host = HostKVTier(pool, host_bytes) if host_bytes >= pool.page_bytes else None
        self.last_take = TakenBlocks()
        pool.reclaim = self.evict

    def __len__(self) -> int:
        return len(self._pages)

    def keep(self, blocks: Sequence[PromptBlock], pages: Sequence[int]) -> int:
        """A one-worker request ends: keep its full blocks (block i in pages[i]); -> blocks kept."""
        kept = 0
        for block in blocks:
            full = block.end - block.start == self.pool.page_tokens and block.start == block.index * self.pool.page_tokens
            if not full or block.index >= len(pages):
                continue
            if block.chain_hash in self._pages:
                self._pages.move_to_end(block.chain_hash)
                continue
            self.pool.retain([pages[block.index]])
            self._pages[block.chain_hash] = pages[block.index]
            kept += 1
        self.evict(len(self._pages) - self.max_pages)
        return kept

    def take(self, blocks: Sequence[PromptBlock]) -> list[int] | None:
        """The pages of a prompt's leading `blocks` (in order from block 0), held for the caller
        (who frees them with its own pages), if every one is in a tier; else None. Blocks in
        the pool are mapped as they are; blocks in the host tier are copied into new pages."""
        ordered = sorted(blocks, key=lambda b: b.index)
        pages: list[int | None] = [self._pages.get(b.chain_hash) for b in ordered]  # None: to copy back
        for i, (block, page) in enumerate(zip(ordered, pages)):
            if block.index != i or (page is None and (self.host is None or block.chain_hash not in self.host)):
                return None
        # Used now: the most recent in their tiers, so that the allocation below, if it makes
        # room, takes other blocks first. The mapped pages are held before it: it may evict them.
        for block, page in zip(ordered, pages):
            if page is None:
                self.host.touch(block.chain_hash)
            else:
                self._pages.move_to_end(block.chain_hash)
        mapped = [p for p in pages if p is not None]
        self.pool.retain(mapped)
        copy_back = [i for i, page in enumerate(pages) if page is None]
        if copy_back and not self._copy_back(ordered, pages, copy_back):
            self.pool.free(mapped)  # the prompt is computed instead (or fails to fit, as it would have)
            return None
        self.hits += len(mapped)
        self.last_take = TakenBlocks(pool=len(mapped), host=len(copy_back))
        self.evict(len(self._pages) - self.max_pages)
        return pages

    def _copy_back(self, ordered: Sequence[PromptBlock], pages: list[int | None], indices: list[int]) -> bool:
        """Blocks `indices` of `ordered`, from the host tier into new pages (filled into `pages`),
        which join the device tier; False if the pool has no room for them, or if making room
        dropped one of them from the host tier."""
        try:
            fresh = self.pool.alloc(len(indices))
        except KVPoolFull:
            return False
        # Looked up after the allocation: making room stores evicted blocks, which may take these slots
        host = [self.host.get(ordered[i].chain_hash) for i in indices]
        if any(h is None for h in host):
            self.pool.free(fresh)
            return False
        self.host.load(host, fresh)
        for i, page in zip(indices, fresh):
            pages[i] = page
            self.pool.retain([page])  # the device tier's hold; the caller's is the allocation
            self._pages[ordered[i].chain_hash] = page
        log.info("kv_prefix_host_load", blocks=len(indices), pool_blocks=len(pages) - len(indices),
                 bytes=len(indices) * self.host.block_bytes, host_blocks=len(self.host),
                 host_hits=self.host.hits, host_stores=self.host.stores, host_evictions=self.host.evictions)
        return True

    def evict(self, n: int) -> int:
        """Let go of up to n least recently used blocks, copied to the host tier first if there
        is one; -> how many (pages another request still maps go back to the pool only when it
        ends)."""
        evicted = []
        while len(evicted) < n and self._pages:
            evicted.append(self._pages.popitem(last=False))
        if self.host is not None and evicted:
            self.host.store(evicted)  # queued before the pages can be handed out again
        self.pool.free([page for _, page in evicted])
        return len(evicted)
