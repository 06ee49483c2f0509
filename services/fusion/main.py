"""The fusion service: merges the partial attention results that ring members publish for each
decode step (per layer, per head) into the exact global attention output.

Each instance owns one partition (its instance id); the scheduler places every request on one
partition, so all parts of a merge meet in the same process.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.aio.msg import Msg

from shared import codec, subjects
from shared.messages import FusionDrop, FusionHeartbeat, FusionReply, FusionRequest, WorkerHeartbeat
from shared.errors import error_text
from shared.service import (ServiceApp, ServiceRuntime, drain_budget_s, main as service_main, serve,
                            wait_until)
from shared.settings import Settings
from services.fusion.table import FusionError, FusionTable, PartitionUsers

log = structlog.get_logger("fusion")


def traced_step(request: FusionRequest, every: int) -> bool:
    """Merges are sampled for tracing by decode step (a span per layer per token would cost more
    than the merge itself): step 0 and every `every`-th step of each request."""
    return any(item.step % every == 0 for item in request.items)


class FusionApp(ServiceApp):
    name = "fusion"
    description = "merges partial attention results (output + log-sum-exp) into the exact softmax"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.table = FusionTable(settings.fusion_timeout_s)
        self.users = PartitionUsers(settings.heartbeat_timeout_s)
        self.trace_every = settings.trace_decode_every
        self._reaper: asyncio.Task | None = None

    async def start(self, rt: ServiceRuntime) -> None:
        self.rt = rt
        meter = rt.telemetry.meter
        self._merges = meter.create_counter("ringserve_fusion_merges", description="partial-attention merges")
        self._batch = meter.create_histogram("ringserve_fusion_batch_items", description="partials per fusion message")
        await serve(rt.bus, subjects.fusion_partials(rt.instance), FusionRequest, self._on_partials,
                    invalid=lambda text: FusionReply(items=[], error=text))
        await serve(rt.bus, subjects.fusion_drop(rt.instance), FusionDrop, self._on_drop)
        await serve(rt.bus, f"{subjects.HEARTBEAT}.worker.>", WorkerHeartbeat, self._on_worker_heartbeat, quiet=True)
        self._reaper = asyncio.create_task(self._reap())

    def heartbeat(self, rt: ServiceRuntime) -> FusionHeartbeat:
        return FusionHeartbeat(
            service=self.name,
            instance=rt.instance,
            draining=rt.stopping.is_set(),
            partition=rt.instance,
            pending_groups=self.table.pending_groups,
        )

    async def stop(self, rt: ServiceRuntime) -> None:
        # Draining: the scheduler gives new requests other partitions (our heartbeat says
        # draining), but requests already placed here keep sending partials, prefilling ones
        # included. Serve until no live worker lists this partition; a grace of two heartbeats
        # first lets a request placed just before the scheduler heard of the drain show up.
        budget = drain_budget_s(self.settings)
        grace_s = min(2 * self.settings.heartbeat_interval_s, budget)
        await asyncio.sleep(grace_s)
        await wait_until(lambda: not self.users.using(rt.instance) and not self.table.pending_groups, budget - grace_s)
        if self._reaper:
            self._reaper.cancel()

    async def _on_partials(self, request: FusionRequest, msg: Msg) -> FusionReply | None:
        before = self.table.merges
        try:
            if traced_step(request, self.trace_every):
                with self.rt.telemetry.tracer.start_as_current_span("fusion.merge", attributes={
                    "worker_id": request.worker_id, "items": len(request.items),
                    "request_ids": sorted({i.request_id for i in request.items}),
                    "layer": request.items[0].layer if request.items else -1,
                    "step": request.items[0].step if request.items else -1,
                }):
                    replies = self.table.add(request, msg.reply)
            else:
                replies = self.table.add(request, msg.reply)
        except FusionError as exc:  # partials that do not fit their group: the sender's error
            log.warning("fusion_bad_partials", worker_id=request.worker_id, error=error_text(exc))
            return FusionReply(items=[], error=error_text(exc))
        self._batch.record(len(request.items))
        self._merges.add(self.table.merges - before)
        await self._send(replies)
        return None

    async def _on_worker_heartbeat(self, beat: WorkerHeartbeat, _msg: Msg) -> None:
        self.users.on_heartbeat(beat.worker_id, beat.fusion_partitions)

    async def _on_drop(self, drop: FusionDrop, _msg: Msg) -> None:
        replies = self.table.drop_request(drop.request_id)
        if replies:
            log.info("fusion_request_dropped", request_id=drop.request_id, waiters=len(replies))
        await self._send(replies)

    async def _send(self, replies) -> None:
        for reply_to, reply in replies:
            if reply_to:
                await self.rt.bus.publish_raw(reply_to, codec.encode(reply))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.table.timeout_s / 4))
            expired = self.table.expire()
            if expired:
                log.warning("fusion_expired", waiters=len(expired))
                await self._send(expired)


def main() -> None:
    service_main(FusionApp)


if __name__ == "__main__":
    main()
