"""Workers' and the scheduler's client of the kvstore service (metadata over NATS, no block bytes).

The KV store only ever saves work, so nothing here raises on a failed call: a lookup that cannot
be answered finds nothing (the prompt is recomputed), and the other calls become no-ops. A
failure is logged once until a call succeeds again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import structlog
from pydantic import BaseModel

from shared import subjects
from shared.bus import Bus
from shared.kv.keys import BlockRef
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
    KVStatsRequest,
    KVTouch,
    KVTouchRequest,
)
from shared.settings import Settings

log = structlog.get_logger("kv")
R = TypeVar("R", bound=BaseModel)


class KVIndexClient:
    def __init__(self, bus: Bus, settings: Settings):
        self.bus = bus
        self.timeout_s = settings.kv_index_timeout_s
        self._failing = False

    async def lookup(self, model_id: str, refs: Sequence[BlockRef], quant: str, num_layers: int) -> int:
        """How many leading blocks of `refs` are stored for all layers; 0 on any error or timeout."""
        if not refs:
            return 0
        hashes = [r.chain_hash for r in refs]
        request = KVLookupRequest(model_id=model_id, quant=quant, num_layers=num_layers, hashes=hashes)
        reply = await self._call(subjects.KV_LOOKUP, request, KVLookupReply)
        return min(reply.blocks, len(refs)) if reply else 0

    async def commit(
        self,
        model_id: str,
        refs: Sequence[BlockRef],
        quant: str,
        num_layers: int,
        nbytes: int,
        request_id: str | None = None,
    ) -> None:
        """All `num_layers` layers of these blocks are in Redis (`nbytes` in total); pins them for `request_id`
        (until its unpin: the scheduler's, when the request ends)."""
        if not refs:
            return
        blocks = [KVCommitBlock(index=r.index, chain_hash=r.chain_hash, parent_hash=r.parent_hash) for r in refs]
        request = KVCommitRequest(
            model_id=model_id, quant=quant, num_layers=num_layers, blocks=blocks, nbytes=nbytes, request_id=request_id
        )
        await self._call(subjects.KV_COMMIT, request, KVCommitReply)

    async def touch(self, model_id: str, hashes_with_importance: Sequence[tuple[str, float]], quant: str) -> None:
        """These blocks were used; `importance` is the attention mass each received (H2O)."""
        if not hashes_with_importance:
            return
        touches = [KVTouch(chain_hash=h, importance=importance) for h, importance in hashes_with_importance]
        await self._call(subjects.KV_TOUCH, KVTouchRequest(model_id=model_id, quant=quant, touches=touches), KVAck)

    async def pin(self, request_id: str, model_id: str, hashes: Sequence[str], quant: str) -> None:
        """Keep these blocks from eviction while `request_id` is in flight."""
        request = KVPinRequest(request_id=request_id, action="pin", model_id=model_id, quant=quant, hashes=list(hashes))
        await self._call(subjects.KV_PIN, request, KVAck)

    async def unpin(self, request_id: str) -> None:
        await self._call(subjects.KV_PIN, KVPinRequest(request_id=request_id, action="unpin"), KVAck)

    async def reserve_shard(self, request_id: str, member: int, nbytes: int) -> bool:
        """Room in the KV budget for `nbytes` more of this member's shard; False (do not write them)
        when there is none, or no kvstore answers: an unaccounted shard could overrun the budget."""
        request = KVShardRequest(request_id=request_id, member=member, action="reserve", nbytes=nbytes)
        reply = await self._call(subjects.KV_SHARD, request, KVShardReply)
        return bool(reply is not None and reply.granted and not reply.error)

    async def release_shard(self, request_id: str, member: int) -> None:
        """This member's shard was deleted: its bytes no longer count against the budget."""
        await self._call(subjects.KV_SHARD, KVShardRequest(request_id=request_id, member=member, action="release"),
                         KVShardReply)

    async def stats(self) -> KVStats:
        reply = await self._call(subjects.KV_STATS, KVStatsRequest(), KVStats)
        return reply or KVStats(error="kvstore unreachable")

    async def _call(self, subject: str, request: BaseModel, reply_model: type[R]) -> R | None:
        try:
            reply = await self.bus.request(subject, request, reply_model, timeout=self.timeout_s)
        except Exception as exc:  # bus down, timeout, no responders, undecodable reply: all mean "no answer"
            if not self._failing:
                log.warning("kvstore_unreachable", subject=subject, error=str(exc))
            self._failing = True
            return None
        if self._failing:
            log.info("kvstore_reachable")
            self._failing = False
        if getattr(reply, "error", None):
            log.warning("kvstore_error", subject=subject, error=reply.error)
        return reply
