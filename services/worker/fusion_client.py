"""Decode partials to the fusion service, sent by the compute thread itself.

A ring member's decode step waits for the fusion service's merge at every layer. Going through
the worker's event loop would cost two thread hand-offs per layer (the compute thread to the loop
and back), each of which can wait behind whatever the loop is doing (publishing tokens, KV I/O).
So the compute thread keeps an event loop and a NATS connection of its own and runs each
request to completion on them. That loop only runs while a request is in flight, so the
connection is renewed after `IDLE_RECONNECT_S` without use (the server's pings went unanswered
meanwhile; it drops a client after two missed ones, 2 minutes apart by default).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from opentelemetry import context as otel_context

from shared import subjects
from shared.bus import Bus, BusError, connect
from shared.messages import FusionReply, FusionRequest, MergedItem, PartialItem
from shared.settings import Settings

IDLE_RECONNECT_S = 60.0


class FusionClient:
    def __init__(self, settings: Settings, worker_id: str, partition_of: Callable[[str], str],
                 on_latency_ms: Callable[[float], None] = lambda ms: None):
        self.settings = settings
        self.worker_id = worker_id
        self.partition_of = partition_of  # request id -> its fusion partition
        self.on_latency_ms = on_latency_ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bus: Bus | None = None
        self._last_used = 0.0

    def fuse(self, partials: list[PartialItem], context: otel_context.Context) -> list[MergedItem]:
        """One layer's partials of a batch -> the merged results, in the same order. Compute
        thread only (blocking)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._fuse(partials, context))

    def close(self) -> None:
        if self._loop is not None:
            if self._bus is not None:
                self._loop.run_until_complete(self._bus.close())
            self._loop.close()
            self._loop = self._bus = None

    async def _connected(self) -> Bus:
        now = time.monotonic()
        if self._bus is not None and (now - self._last_used > IDLE_RECONNECT_S or not self._bus.is_connected):
            await self._bus.close()
            self._bus = None
        if self._bus is None:
            self._bus = Bus(await connect(self.settings, name=f"ringserve-worker-{self.worker_id}-fusion"), "worker")
        self._last_used = now
        return self._bus

    async def _fuse(self, partials: list[PartialItem], context: otel_context.Context) -> list[MergedItem]:
        token = otel_context.attach(context)  # the fusion messages carry the request's trace
        try:
            bus = await self._connected()
            by_partition: dict[str, list[PartialItem]] = {}
            for p in partials:
                by_partition.setdefault(self.partition_of(p.request_id), []).append(p)

            async def one(partition: str, items: list[PartialItem]) -> FusionReply:
                return await bus.request(subjects.fusion_partials(partition),
                                         FusionRequest(worker_id=self.worker_id, items=items), FusionReply,
                                         timeout=self.settings.fusion_timeout_s)

            started = time.perf_counter()
            replies = await asyncio.gather(*(one(k, v) for k, v in by_partition.items()))
            self.on_latency_ms((time.perf_counter() - started) * 1000)
        finally:
            otel_context.detach(token)
        merged: dict[tuple[str, int, int], MergedItem] = {}
        for reply in replies:
            if reply.error:
                raise BusError(f"fusion: {reply.error}")
            for item in reply.items:
                merged[(item.request_id, item.step, item.layer)] = item
        return [merged[(p.request_id, p.step, p.layer)] for p in partials]
