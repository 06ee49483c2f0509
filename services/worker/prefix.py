"""Prefix caching on the worker: load the K/V of a prompt's cached positions before a prefill, store
the blocks it computed after.

The scheduler decides how many leading prompt positions are cached (`PrefillCommand.cached_tokens`,
whole blocks) and names the blocks overlapping each member's segments (`kv_blocks`). A member
loads every block overlapping its cached positions and cuts out the rows it holds: chunk
boundaries need not fall on block boundaries. If any block is missing or unreadable, the member
computes all its positions instead; the ring exchange carries only K/V, so nobody else notices.
After the prefill a member stores the blocks lying entirely inside its own segments (a block
straddling two members is never stored: neither holds all its rows).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog
import torch
from torch import Tensor

from shared.kv.client import KVIndexClient
from shared.kv.keys import BlockRef
from shared.kv.store import KVBlockStore, PutItem
from shared.messages import PrefillCommand, PromptBlock
from shared.settings import Settings
from services.worker.io_loop import IOLoopBlockStore
from shared.positions import Run, clip_runs, row_of
from services.worker.kv_cache import CachedRows, RequestKV

log = structlog.get_logger("worker")
# Blocks per put_blocks call (all layers each): bounds the encoded bytes in memory at once, and
# each batch is committed as soon as it is written, so a long prompt becomes usable block by block.
STORE_BATCH_BLOCKS = 16


# ---- positions and blocks (pure) ----------------------------------------------------------------


def blocks_overlapping(blocks: Sequence[BlockRef], runs: Sequence[Run]) -> list[BlockRef]:
    return [b for b in blocks if any(b.start < e and s < b.end for s, e in runs)]


def blocks_inside(blocks: Sequence[BlockRef], runs: Sequence[Run]) -> list[BlockRef]:
    """Blocks whose every position lies in one run: the member holds all their rows."""
    return [b for b in blocks if any(s <= b.start and b.end <= e for s, e in runs)]


def gather_rows(runs: Sequence[Run], blocks: Sequence[tuple[BlockRef, Tensor]]) -> Tensor:
    """The rows of `runs`' positions, in order, cut from blocks ([block tokens, ...] each) covering
    them; raises ValueError if a position is in no block."""
    by_start = sorted(blocks, key=lambda item: item[0].start)
    pieces, wanted = [], 0
    for s, e in runs:
        wanted += e - s
        for ref, rows in by_start:
            lo, hi = max(s, ref.start), min(e, ref.end)
            if lo < hi:
                pieces.append(rows[lo - ref.start : hi - ref.start])
    got = sum(p.shape[0] for p in pieces)
    if got != wanted:
        raise ValueError(f"blocks cover {got} of {wanted} positions")
    return torch.cat(pieces)


def block_refs(blocks: Sequence[PromptBlock]) -> list[BlockRef]:
    return [BlockRef(b.index, b.start, b.end, b.chain_hash, b.parent_hash) for b in blocks]


def member_runs(cmd: PrefillCommand) -> list[Run]:
    return [(s.start, s.end) for s in cmd.plan.segments[cmd.member]]


# ---- load and store -----------------------------------------------------------------------------


class PrefixCache:
    def __init__(self, store: KVBlockStore | IOLoopBlockStore, index: KVIndexClient, settings: Settings, model_id: str,
                 num_layers: int, dtype: torch.dtype, device: torch.device,
                 reusable: Callable[[int], bool]):
        self.store = store
        self.index = index
        self.settings = settings
        self.model_id = model_id
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device
        # reusable(prompt_tokens): whether stored K/V of this prompt length mean the same in another prompt
        self.reusable = reusable

    def record_resident_hit(self, pool_blocks: int, host_blocks: int = 0) -> None:
        """Blocks a prefill took from the worker's own tiers (mapped from the pool, copied back
        from host memory), in the store's metrics."""
        self.store.metrics.blocks("hit", pool_blocks, "pool")
        if host_blocks:
            self.store.metrics.blocks("hit", host_blocks, "host")

    def enabled(self, cmd: PrefillCommand) -> bool:
        return self.settings.kv_store_enabled and bool(cmd.kv_blocks) and self.reusable(cmd.plan.prompt_tokens)

    async def load(self, cmd: PrefillCommand) -> CachedRows | None:
        """This member's cached rows, or None (nothing cached here, or a block missed: compute all)."""
        runs = clip_runs(member_runs(cmd), 0, cmd.cached_tokens)
        if not runs or not self.enabled(cmd) or cmd.cached_tokens >= cmd.plan.prompt_tokens:
            return None  # (the last position is always computed: its logits give the first token)
        refs = blocks_overlapping(block_refs(cmd.kv_blocks), runs)
        quant = cmd.plan.kv_quant.value
        layers = range(self.num_layers)
        found = await self.store.get_blocks(self.model_id, refs, layers, quant, self.dtype, self.device)
        if len(found) < len(refs) * self.num_layers:
            log.warning("kv_prefix_miss", request_id=cmd.plan.request_id, member=cmd.member,
                        blocks=len(refs), found=len(found) // max(self.num_layers, 1))
            return None
        try:
            keys = [gather_rows(runs, [(r, found[(layer, r.index)][0]) for r in refs]) for layer in layers]
            values = [gather_rows(runs, [(r, found[(layer, r.index)][1]) for r in refs]) for layer in layers]
        except ValueError as exc:  # the scheduler named blocks that do not cover the cached positions
            log.warning("kv_prefix_uncovered", request_id=cmd.plan.request_id, error=str(exc))
            return None
        return CachedRows(cmd.cached_tokens, keys, values)

    async def store_computed(self, cmd: PrefillCommand, kv: RequestKV, loaded: bool,
                             running: Callable[[], bool] = lambda: False) -> int:
        """Store the blocks inside this member's segments that it computed; returns the blocks stored.

        Blocks below `cmd.cached_tokens` are already stored when they were `loaded` (from Redis
        or the pool). A member whose load missed stores those too: the store had lost them. While `running()` (the request is still held here)
        each commit pins its blocks to the request, so they outlive it at least: the scheduler
        unpins at its end. Once it has ended, a commit pins nothing (no unpin would follow)."""
        if not self.enabled(cmd):
            return 0
        runs = member_runs(cmd)
        missed = not loaded and bool(clip_runs(runs, 0, cmd.cached_tokens))
        done_below = 0 if missed else cmd.cached_tokens
        refs = [r for r in blocks_inside(block_refs(cmd.kv_blocks), runs) if r.start >= done_below]
        refs = refs[: self.settings.kv_store_max_blocks]
        quant = cmd.plan.kv_quant.value
        # Prompt rows never change once prefilled; the caller holds `kv` so its pages stay ours.
        stored = 0
        for first in range(0, len(refs), STORE_BATCH_BLOCKS):
            batch = refs[first : first + STORE_BATCH_BLOCKS]
            batch_items: list[PutItem] = []
            for ref in batch:
                lo = row_of(runs, ref.start)
                keys, values = await asyncio.to_thread(kv.rows_to_host, lo, lo + ref.end - ref.start)
                batch_items += [(i, ref, k, v) for i, (k, v) in enumerate(zip(keys, values))]
            written = await self.store.put_blocks(batch_items, self.model_id, quant)
            if not written:
                break  # Redis is unreachable: the rest would fail the same way
            request_id = cmd.plan.request_id if running() else None
            await self.index.commit(self.model_id, batch, quant, self.num_layers, written, request_id)
            stored += len(batch)
        return stored


def block_masses(runs: list[tuple[int, int]], mass: torch.Tensor, blocks: list[PromptBlock]) -> list[tuple[str, float]]:
    """(chain hash, attention mass) of each block, from the mass of the rows this shard holds.

    runs: the positions of the shard's rows, in row order; mass: [rows] (it may cover only the
    first rows). A block split over several members gets each member's share: the kvstore adds them.
    """
    out = []
    for block in blocks:
        total, row = 0.0, 0
        for s, e in runs:
            lo, hi = max(s, block.start), min(e, block.end)
            if lo < hi:
                total += float(mass[row + lo - s : row + hi - s].sum())
            row += e - s
        if total > 0:
            out.append((block.chain_hash, total))
    return out
