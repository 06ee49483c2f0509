"""The scheduler's line to the workers over NATS (RequestRunner's `port`): prefill, release and
abort commands to a worker's inbox, and the tokens ring leaders publish for this instance's
requests, handed to each request's queue."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from shared import subjects
from shared.bus import BusError, PayloadTooLarge
from shared.messages import AbortCommand, DecodeTokens, ErrorCode, PrefillCommand, PrefillResult, ReleaseCommand, TokenItem
from shared.service import serve
from shared.settings import Settings
from services.scheduler.api import ApiError

PREFILL_TIMEOUT_FACTOR = 1.0  # of request_timeout_s


class BusWorkerPort:
    """RequestRunner's view of the workers, over NATS. Ring leaders publish the tokens of this
    instance's requests on its own subject; each goes to its request's queue."""

    def __init__(self, bus, settings: Settings, instance: str):
        self.bus = bus
        self.settings = settings
        self.instance = instance
        self.events_subject = subjects.tokens(instance)
        self._queues: dict[str, asyncio.Queue[TokenItem | None]] = {}

    async def start(self) -> None:
        await serve(self.bus, self.events_subject, DecodeTokens, self._on_tokens)

    def watch(self, request_id: str) -> asyncio.Queue[TokenItem | None]:
        return self._queues.setdefault(request_id, asyncio.Queue())

    def unwatch(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _on_tokens(self, batch: DecodeTokens, _msg: Msg) -> None:
        for item in batch.items:
            queue = self._queues.get(item.request_id)
            if queue is not None:  # else the request ended here already: late tokens are dropped
                queue.put_nowait(item)

    async def prefill(self, worker_id: str, cmd: PrefillCommand) -> PrefillResult:
        try:
            return await self.bus.request(subjects.worker_inbox(worker_id, "prefill"), cmd, PrefillResult,
                                          timeout=self.settings.request_timeout_s * PREFILL_TIMEOUT_FACTOR)
        except PayloadTooLarge as exc:
            # The prompt's share of the ring does not fit one NATS message: more workers (a
            # larger ring) or a larger server max_payload would carry it.
            raise ApiError(ErrorCode.TOO_LONG, f"worker {worker_id}: {exc}", cmd.plan.request_id) from None
        except BusError as exc:
            raise ApiError(ErrorCode.UNAVAILABLE, f"worker {worker_id}: {exc}", cmd.plan.request_id) from None

    async def release(self, worker_id: str, request_id: str) -> None:
        await self.bus.publish(subjects.worker_inbox(worker_id, "release"), ReleaseCommand(request_id=request_id))

    async def abort(self, worker_id: str, request_id: str) -> None:
        await self.bus.publish(subjects.worker_inbox(worker_id, "abort"), AbortCommand(request_id=request_id))
