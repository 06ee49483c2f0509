"""Keeps a copy of this worker's KV shard of each running request in Redis (shared/kv/shards.py),
at most `every_tokens` decode tokens behind, so that another worker could load it.

Nothing here blocks compute: a save is an asyncio task on the worker's event loop that copies rows
the compute thread no longer writes (a cache only appends). One save per request runs at a time;
rows whose save failed (Redis down, or no room in the KV budget) are retried with the next ones.
On release the shard is deleted once any save in flight has ended, so a late save never
resurrects it.

Shards count against the KV budget: with a `budget` (the kvstore client), each increment is
written only once the kvstore has granted room for its bytes, and the shard's bytes are released
after it is deleted. Without a kvstore answering, nothing is written (it could not be accounted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass

import structlog

from shared.kv.client import KVIndexClient
from shared.kv.shards import ShardStore
from services.worker.io_loop import IOLoopShardStore
from services.worker.kv_cache import RequestKV

log = structlog.get_logger("worker")
# Rows per increment: a long prompt's shard goes to Redis as blobs of a few MB, not one huge one.
MAX_INCREMENT_ROWS = 2048


@dataclass
class _Progress:
    member: int
    kv: RequestKV
    saved_rows: int = 0
    next_seq: int = 0
    saving: asyncio.Task | None = None
    released: bool = False  # a save in flight stops at its next increment
    reserved: bool = False  # some room in the budget was granted: release it with the shard
    # Bytes granted for an increment whose write then failed: the retry uses them, not new room.
    credit: int = 0
    granting: int = 0  # bytes granted for the increment being written


class ShardPersister:
    def __init__(self, shards: ShardStore | IOLoopShardStore, every_tokens: int, budget: KVIndexClient | None = None):
        self.shards = shards
        self.every_tokens = every_tokens
        self.budget = budget
        self._requests: dict[str, _Progress] = {}
        self._tasks: set[asyncio.Task] = set()

    def track(self, request_id: str, member: int, kv: RequestKV) -> None:
        """A prefill ended: save all its rows now, then follow the shard as decode grows it."""
        self._requests[request_id] = _Progress(member, kv)
        self._save_if_due(request_id, due_rows=1)

    def grew(self, request_id: str) -> None:
        """A decode step ran: save once `every_tokens` rows are unsaved."""
        self._save_if_due(request_id, due_rows=self.every_tokens)

    def forget(self, request_id: str) -> None:
        """The request ended here: delete this member's shard after any save in flight."""
        progress = self._requests.pop(request_id, None)
        if progress is not None:
            progress.released = True
            self._spawn(self._delete(request_id, progress))

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.shards.close()

    def _save_if_due(self, request_id: str, due_rows: int) -> None:
        progress = self._requests.get(request_id)
        if progress is None or (progress.saving is not None and not progress.saving.done()):
            return
        if progress.kv.tokens - progress.saved_rows >= due_rows:
            progress.saving = self._spawn(self._save(request_id, progress, progress.kv.tokens))

    async def _save(self, request_id: str, progress: _Progress, end: int) -> None:
        kv = progress.kv
        reserve = None
        if self.budget is not None:
            budget = self.budget

            async def reserve(nbytes: int) -> bool:
                need = max(0, nbytes - progress.credit)
                granted = need == 0 or await budget.reserve_shard(request_id, progress.member, need)
                if granted:
                    progress.reserved = progress.reserved or need > 0
                    progress.credit = max(0, progress.credit - nbytes)
                    progress.granting = nbytes
                return granted

        if not kv.acquire():  # released here already: its pages may be another request's now
            return
        try:
            while progress.saved_rows < end and not progress.released:
                first = progress.saved_rows
                stop = min(end, first + MAX_INCREMENT_ROWS)
                keys, values = await asyncio.to_thread(kv.rows_to_host, first, stop)  # off the event loop
                ok = await self.shards.save_increment(
                    request_id, progress.member, progress.next_seq, kv.runs_of_rows(first, stop),
                    keys, values, reserve=reserve,
                )
                granted, progress.granting = progress.granting, 0
                if not ok:
                    progress.credit += granted  # room granted but nothing written: kept for the retry
                    return  # Redis unreachable or no room: these rows go with the next save
                progress.saved_rows, progress.next_seq = stop, progress.next_seq + 1
        finally:
            kv.unacquire()

    async def _delete(self, request_id: str, progress: _Progress) -> None:
        if progress.saving is not None:
            await asyncio.gather(progress.saving, return_exceptions=True)
        await self.shards.delete(request_id, progress.member)
        if self.budget is not None and progress.reserved:
            await self.budget.release_shard(request_id, progress.member)

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.create_task(_logged(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _logged(coro: Coroutine) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:  # a spare copy failing must never reach the request
        log.exception("kv_shard_save_failed")
