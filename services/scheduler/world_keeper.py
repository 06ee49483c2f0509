"""The scheduler's view of who is alive and the torch.distributed world over them.

Heartbeats of every service feed the registry (workers, fusion partitions, the other
instances `ringserve status` lists); a loop sweeps the workers and fusion partitions whose
heartbeats stopped (the runs of the rings that held them are cancelled with `lost` set: the
request recovers or fails, recovery_run.py and main.py) and re-forms the world when membership
changed and no multi-worker ring is running (a ring that lost a member is dead and does not count).

A ring's leader may report its failed fusion merge (`unavailable`: no responder, a timeout) before
the sweep notices the partition is gone: `fusion_lost` then tells a dead partition from a failure
of the ring itself by the partition's heartbeats, so either way the request is recovered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import structlog
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus
from shared.messages import ErrorCode, FusionHeartbeat, ServiceHeartbeat, WorkerHeartbeat, WorldReady
from shared.service import serve
from shared.settings import Settings
from services.scheduler.api import ApiError
from services.scheduler.recovery import Loss, RecoveryCause
from services.scheduler.registry import Registry
from services.scheduler.runner import RequestRunner

log = structlog.get_logger("scheduler")
WORLD_RETRY_MARGIN_S = 2.0
# How often a recovering request looks whether the world has re-formed without the dead workers.
WORLD_POLL_S = 0.05
# Services whose instances `ringserve status` lists from their plain heartbeats (workers and
# fusion send richer ones, read on their own subjects)
OTHER_SERVICES = ("scheduler", "kvstore", "gateway")


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
        return any(r.s.plan is not None and r.s.plan.size > 1 and r.lost is None for r in self.runners.values())

    async def run(self) -> None:
        """Re-form the torch.distributed world between multi-worker requests when membership changes."""
        interval = self.settings.heartbeat_interval_s / 2
        while True:
            try:
                await asyncio.wait_for(self._workers_changed.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._workers_changed.clear()
            partitions = self.registry.sweep_fusion()
            if partitions:
                log.warning("fusion_lost", partitions=partitions)
                self._stop_runs_on_fusion(set(partitions))
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

    async def fusion_lost(self, runner: RequestRunner, err: ApiError) -> bool:
        """Whether `runner`'s run, failed with `err`, died because its fusion partition did; if
        so its `lost` says it. Only an `unavailable` merge of a bus-fused ring can be that: then
        wait until the partition either sends a heartbeat after the failure (alive: the ring
        failed by itself) or is no longer live (swept as silent, or draining; within the
        heartbeat timeout)."""
        plan = runner.s.plan
        if (plan is None or plan.size < 2 or plan.fusion != "bus" or err.code != ErrorCode.UNAVAILABLE
                or runner.s.cancelled):
            return False
        failed_at = time.monotonic()
        deadline = failed_at + self.settings.heartbeat_timeout_s + self.settings.heartbeat_interval_s
        while time.monotonic() < deadline and not runner.s.cancelled:
            if not self.registry.fusion_live(plan.fusion_partition):
                runner.lost = Loss(RecoveryCause.FUSION, (plan.fusion_partition,))
                return True
            if self.registry.fusion_seen_since(plan.fusion_partition, failed_at):
                return False
            await asyncio.sleep(WORLD_POLL_S)
        return False

    def _stop_runs_on(self, workers: set[str]) -> None:
        """Cancel the runs whose rings held a lost worker, saying which (the request recovers or fails)."""
        for runner in list(self.runners.values()):
            plan = runner.s.plan
            if plan is not None and workers & set(plan.workers):
                self._stop(runner, Loss(RecoveryCause.WORKER, tuple(sorted(workers & set(plan.workers)))))

    def _stop_runs_on_fusion(self, partitions: set[str]) -> None:
        """Cancel the runs of rings whose decode merges on a lost fusion partition (rings of one
        and collective fusion merge on none)."""
        for runner in list(self.runners.values()):
            plan = runner.s.plan
            if plan is not None and plan.size > 1 and plan.fusion == "bus" and plan.fusion_partition in partitions:
                self._stop(runner, Loss(RecoveryCause.FUSION, (plan.fusion_partition,)))

    @staticmethod
    def _stop(runner: RequestRunner, loss: Loss) -> None:
        """Only a run under way is cancelled: a run that already failed is in its error handling,
        which decides by itself (fusion_lost, or the error stands)."""
        if not runner.running or runner.lost is not None:
            return
        runner.lost = loss
        task = runner.task
        if task is not None:
            task.cancel()
