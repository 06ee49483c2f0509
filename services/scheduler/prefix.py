"""Prefix caching at admission: how many leading prompt positions the KV store already holds.

The prompt's full blocks are named by their chain hashes (shared/kv/keys.py); the kvstore service
answers how many leading ones are stored for every layer under the request's quant mode. Those
blocks are pinned (kept from eviction) until the request ends, and each ring member is told the
blocks overlapping its segments: it loads the cached ones and stores the ones it computes, pinned
to the request too (the worker's commit carries its id), so the unpin at the end covers both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from opentelemetry.trace import Tracer

from shared.kv.client import KVIndexClient
from shared.kv.keys import BlockRef, block_chain
from shared.messages import ModelInfo, PromptBlock, Segment
from shared.settings import Settings

log = structlog.get_logger("scheduler")


def cached_prompt_tokens(stored_blocks: int, block_tokens: int, prompt_tokens: int) -> int:
    """Leading positions whose K/V are loaded, not computed: whole stored blocks, never the last
    position (its logits give the first token, so it is always computed)."""
    return min(stored_blocks * block_tokens, ((prompt_tokens - 1) // block_tokens) * block_tokens)


def member_blocks(blocks: Sequence[BlockRef], segments: Sequence[Segment]) -> list[PromptBlock]:
    """The blocks overlapping one ring member's segments, as PrefillCommand carries them."""
    return [
        PromptBlock(index=b.index, start=b.start, end=b.end, chain_hash=b.chain_hash, parent_hash=b.parent_hash)
        for b in blocks
        if any(b.start < s.end and s.start < b.end for s in segments)
    ]


@dataclass
class PrefixHit:
    blocks: list[BlockRef] = field(default_factory=list)  # the prompt's full blocks (empty: store off)
    cached_tokens: int = 0


class PrefixIndex:
    def __init__(self, index: KVIndexClient, settings: Settings, tracer: Tracer):
        self.index = index
        self.settings = settings
        self.tracer = tracer

    @asynccontextmanager
    async def hold(
        self, request_id: str, model: ModelInfo, prompt_ids: list[int], quant: str, cacheable: bool = True
    ) -> AsyncIterator[PrefixHit]:
        """Look the prompt up and keep its cached blocks pinned for the body of the `async with`;
        the blocks its workers compute and commit meanwhile are pinned to it as well. Not
        `cacheable`: no lookup and no blocks, so its workers neither load nor store any."""
        hit = await self.lookup(request_id, model, prompt_ids, quant) if cacheable else PrefixHit()
        try:
            yield hit
        finally:
            if hit.blocks:  # cached or not: the workers may have pinned the blocks they stored
                await self.index.unpin(request_id)

    async def lookup(self, request_id: str, model: ModelInfo, prompt_ids: list[int], quant: str) -> PrefixHit:
        if not self.settings.kv_store_enabled:
            return PrefixHit()
        block = self.settings.kv_block_tokens
        with self.tracer.start_as_current_span("scheduler.prefix_lookup", attributes={
            "request_id": request_id, "prompt_tokens": len(prompt_ids), "kv.quant": quant, "kv.block_tokens": block,
        }) as span:
            # Hashing a million-token prompt takes a while: off the event loop.
            blocks = await asyncio.to_thread(block_chain, model.name, prompt_ids, block)
            stored = await self.index.lookup(model.name, blocks, quant, model.num_layers) if blocks else 0
            cached = cached_prompt_tokens(stored, block, len(prompt_ids))
            if cached:
                await self.index.pin(request_id, model.name, [b.chain_hash for b in blocks[: cached // block]], quant)
            span.set_attribute("kv.blocks", len(blocks))
            span.set_attribute("kv.blocks_stored", stored)
            span.set_attribute("cached_tokens", cached)
            log.info("prefix_lookup", blocks=len(blocks), stored=stored, cached_tokens=cached, quant=quant)
            return PrefixHit(blocks, cached)
