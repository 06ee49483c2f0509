"""Prompt blocks kept in the KV pool after their request ended (issue 10, the device tier): a
later prompt with the same prefix maps those pages into its own block table, no copy, no Redis.

Only blocks a request held whole on one worker, in position order, computed with the model's
own attention (no per-request pattern): there block i of the prompt is page i of the request
(a page is a block: both KV_BLOCK_TOKENS). Blocks are named by their chain hash (the prefix
cache's: the same hash means the same tokens before and in the block, so the same K/V). Pages
are shared by reference counts (KVPool.retain / free): a request mapping them holds them while
it runs, and never writes them (its own rows start after them). Least recently used blocks go
first when the pool needs pages (KVPool.reclaim) or past `max_pages`.

All calls come from the compute thread, as every use of the pool's pages does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from shared.messages import PromptBlock
from services.worker.kv_cache import KVPool


class ResidentPrefix:
    def __init__(self, pool: KVPool, max_pages: int):
        self.pool = pool
        self.max_pages = max_pages
        self._pages: OrderedDict[str, int] = OrderedDict()  # chain hash -> page, least recent first
        self.hits = 0  # blocks mapped into a prefill
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
        (who frees them with its own pages), if every one is resident; else None."""
        pages = []
        for i, block in enumerate(sorted(blocks, key=lambda b: b.index)):
            page = self._pages.get(block.chain_hash)
            if block.index != i or page is None:
                return None
            pages.append(page)
        for block in blocks:
            self._pages.move_to_end(block.chain_hash)
        self.pool.retain(pages)
        self.hits += len(pages)
        return pages

    def evict(self, n: int) -> int:
        """Let go of up to n least recently used blocks; -> how many (pages another request
        still maps go back to the pool only when it ends)."""
        freed = 0
        while freed < n and self._pages:
            _, page = self._pages.popitem(last=False)
            self.pool.free([page])
            freed += 1
        return freed
