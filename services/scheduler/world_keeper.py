"""The scheduler's view of who is alive and the torch.distributed world over them.

Heartbeats of every service feed the registry (workers, fusion partitions, the other
instances `ringserve status` lists); a loop sweeps the workers whose heartbeats stopped (their
requests' runs are cancelled with `lost_workers` set: the request recovers or fails, main.py)
and re-forms the world when membership changed and no multi-worker ring is running (a ring that
lost a member is dead and does not count).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import structlog
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus
from shared.messages import FusionHeartbeat, ServiceHeartbeat, WorkerHeartbeat, WorldReady
from shared.service import serve
from shared.settings import Settings
from services.scheduler.registry import Registry
from services.scheduler.runner import RequestRunner

log = structlog.get_logger("scheduler")
WORLD_RETRY_MARGIN_S = 2.0
# How often a recovering request looks whether the world has re-formed without the dead workers.
WORLD_POLL_S = 0.05
# Services whose instances `ringserve status` lists from their plain heartbeats (workers and
# fusion send richer ones, read on their own subjects)
OTHER_SERVICES = ("scheduler", "kvstore")


class WorldKeeper:
    def __init__(self, registry: Registry, bus: Bus, settings: Settings, runners: Mapping[str, RequestRunner]):
        self.registry = registry
        self.bus = bus
        self.settings = settings
        self.runners = runners  # the scheduler's running requests, by id
        self._workers_changed = asyncio.Event()

    async def start(self) -> None:
        await serve(self.bus, subjects.heartbeats("worker"), WorkerHeartbeat, self._on_worker_heartbeat)
        await serve(self.bus, subjects.heartbeats("fusion"), FusionHeartbeat, self._on_fusion_heartbeat)
        for service in OTHER_SERVICES:
            await serve(self.bus, subjects.heartbeats(service), ServiceHeartbeat, self._on_service_heartbeat)
        await serve(self.bus, subjects.WORLD_READY, WorldReady, self._on_world_ready)

    async def _on_worker_heartbeat(self, beat: WorkerHeartbeat, _msg: Msg) -> None:
        known = beat.worker_id in self.registry.workers
        self.registry.on_worker(beat)
        if not known:
            log.info("worker_joined", worker_id=beat.worker_id)
            self._workers_changed.set()

    async def _on_service_heartbeat(self, beat: ServiceHeartbeat, _msg: Msg) -> None:
        self.registry.on_service(beat.service, beat.instance, beat.draining)

    async def _on_fusion_heartbeat(self, beat: FusionHeartbeat, msg: Msg) -> None:
        await self._on_service_heartbeat(beat, msg)
        self.registry.on_fusion(beat.partition, beat.draining)

    async def _on_world_ready(self, ready: WorldReady, _msg: Msg) -> None:
        self.registry.on_ready(ready.worker_id, ready.generation, ready.ok)
        if not ready.ok:
            log.warning("world_join_failed", worker_id=ready.worker_id, error=ready.error)
        elif self.registry.world_ready:
            log.info("world_ready", generation=self.registry.generation, members=self.registry.members)

    def rings_active(self) -> bool:
        # A ring that lost a member is dead: its request (failing or about to be recovered) must
        # not hold back the new world its recovery may need.
        return any(r.s.plan is not None and r.s.plan.size > 1 and not r.lost_workers for r in self.runners.values())

    async def run(self) -> None:
        """Re-form the torch.distributed world between multi-worker requests when membership changes."""
        interval = self.settings.heartbeat_interval_s / 2
        while True:
            try:
                await asyncio.wait_for(self._workers_changed.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._workers_changed.clear()
            gone = self.registry.sweep()
            if gone:
                log.warning("workers_lost", workers=gone)
                self._stop_runs_on(set(gone))
            self._report_devices()
            # A failed or unfinished formation is retried once the joins have surely timed out.
            retry = (not self.registry.world_ready and
                     time.monotonic() - self.registry.formed_at > self.settings.dist_timeout_s + WORLD_RETRY_MARGIN_S)
            if (self.registry.world_needs_reform() or retry) and not self.rings_active():
                # The backend follows the members' devices (their heartbeats), never this process's.
                form = self.registry.next_world()
                if form is not None:
                    log.info("world_forming", generation=form.generation, members=form.members, backend=form.backend)
                    await self.bus.publish(subjects.WORLD_FORM, form)

    async def reformed(self, cancelled: Callable[[], bool]) -> None:
        """Wait (at most dist_timeout_s, the time a join may take) for the world to re-form without
        the dead workers while more than one worker is live: until then placement sees no world
        and would put a recovering request on one survivor, where a ring of them would prefill it
        faster. Not while other rings run (the world waits for them) or with one survivor left."""
        deadline = time.monotonic() + self.settings.dist_timeout_s
        while (not self.registry.world_ready and len(self.registry.live_workers()) > 1 and not self.rings_active()
               and not cancelled() and time.monotonic() < deadline):
            await asyncio.sleep(WORLD_POLL_S)

    def _report_devices(self) -> None:
        """A world never spans CPU and CUDA workers: say, once per change, who is left out."""
        plan = self.registry.device_change()
        if plan is None:
            return
        if plan.excluded:
            log.warning("world_devices_mixed", device=plan.device, backend=plan.backend, members=list(plan.members),
                        excluded=list(plan.excluded), live_by_device=dict(plan.counts))
        else:
            log.info("world_devices_uniform", device=plan.device, backend=plan.backend)

    def _stop_runs_on(self, workers: set[str]) -> None:
        """Cancel the runs whose rings held a lost worker, saying which (the request recovers or fails)."""
        for runner in self.runners.values():
            plan = runner.s.plan
            if plan is not None and workers & set(plan.workers):
                runner.lost_workers = sorted(workers & set(plan.workers))
                task = getattr(runner, "task", None)
                if task is not None:
                    task.cancel()
