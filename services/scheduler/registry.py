"""The scheduler's view of the cluster, built from heartbeats: live workers, fusion partitions,
and the torch.distributed world (which workers are in it, in what rank order, which generation,
which backend).

The world's backend follows its members' devices, as each worker reports in its heartbeats (the
scheduler's own device plays no part): all CUDA -> NCCL, all CPU -> gloo. A world never spans
both kinds: when live workers differ, the kind with the most of them forms the world (a tie goes
to CUDA) and the others stay out of it; they still serve single-worker requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.messages import ModelInfo, QueuedRequest, ServiceStatus, StatusReply, WorkerHeartbeat, WorkerStatus, WorldForm

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def device_kind(device: str) -> str:
    """A heartbeat's device as the kind a world is formed over: "cuda" ("cuda", "cuda:1") or "cpu"."""
    return "cuda" if device.split(":", 1)[0] == "cuda" else "cpu"


@dataclass(frozen=True)
class WorldPlan:
    """Who should be in the world now: members in rank order, all on `device`; `excluded` are the
    live workers on another device, left out."""

    members: tuple[str, ...]
    device: str
    backend: str
    excluded: tuple[str, ...]
    counts: tuple[tuple[str, int], ...]  # live workers per device kind, sorted by kind


def plan_world(live: list[WorkerHeartbeat]) -> WorldPlan | None:
    """The world over `live` workers: the device kind with the most of them (ties: CUDA), members
    sorted by worker id. None without live workers."""
    if not live:
        return None
    by_kind: dict[str, list[str]] = {}
    for beat in live:
        by_kind.setdefault(device_kind(beat.device), []).append(beat.worker_id)
    device = max(by_kind, key=lambda kind: (len(by_kind[kind]), kind == "cuda"))
    excluded = sorted(w for kind, ids in by_kind.items() if kind != device for w in ids)
    return WorldPlan(members=tuple(sorted(by_kind[device])), device=device, backend=BACKENDS[device],
                     excluded=tuple(excluded), counts=tuple(sorted((k, len(v)) for k, v in by_kind.items())))


@dataclass
class WorkerEntry:
    beat: WorkerHeartbeat
    last_seen: float


@dataclass
class Registry:
    timeout_s: float
    workers: dict[str, WorkerEntry] = field(default_factory=dict)
    fusion: dict[str, float] = field(default_factory=dict)  # partition -> last seen
    # every other service's instances: (service, instance) -> (draining, last seen)
    services: dict[tuple[str, str], tuple[bool, float]] = field(default_factory=dict)
    # The world the scheduler last formed, and which of its members have joined.
    generation: int = 0
    members: list[str] = field(default_factory=list)
    backend: str | None = None
    ready: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    formed_at: float = 0.0
    # The live workers left out for their device, as last reported by device_change().
    reported_excluded: tuple[str, ...] = ()

    # ---------------------------------------------------------------- heartbeats
    def on_worker(self, beat: WorkerHeartbeat, now: float | None = None) -> None:
        self.workers[beat.worker_id] = WorkerEntry(beat, time.monotonic() if now is None else now)

    def on_service(self, service: str, instance: str, draining: bool, now: float | None = None) -> None:
        """A heartbeat of any service but a worker (scheduler, fusion, kvstore, gateway)."""
        self.services[(service, instance)] = (draining, time.monotonic() if now is None else now)

    def service_instances(self, now: float | None = None) -> list[tuple[str, str, bool, float]]:
        """(service, instance, draining, seconds since its last heartbeat), sorted."""
        now = time.monotonic() if now is None else now
        return [(service, instance, draining, now - seen)
                for (service, instance), (draining, seen) in sorted(self.services.items())]

    def on_fusion(self, partition: str, draining: bool, now: float | None = None) -> None:
        if draining:
            self.fusion.pop(partition, None)
        else:
            self.fusion[partition] = time.monotonic() if now is None else now

    def sweep_fusion(self, now: float | None = None) -> list[str]:
        """Drop the fusion partitions that went silent and return them (their rings' runs are
        dead: world_keeper stops them for recovery). A draining partition left the map already
        (on_fusion): it still serves the requests placed on it, so it is never swept as lost."""
        now = time.monotonic() if now is None else now
        gone = sorted(p for p, seen in self.fusion.items() if now - seen > self.timeout_s)
        for p in gone:
            del self.fusion[p]
        return gone

    def fusion_live(self, partition: str) -> bool:
        """Whether `partition` is heard from and takes new requests."""
        return partition in self.fusion

    def fusion_seen_since(self, partition: str, since: float) -> bool:
        """Whether `partition` sent a heartbeat at or after `since` (monotonic): it is alive."""
        return self.fusion.get(partition, float("-inf")) >= since

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop workers and fusion partitions that went silent; return the workers dropped
        (sweep_fusion first returns the partitions)."""
        now = time.monotonic() if now is None else now
        gone = [w for w, e in self.workers.items() if now - e.last_seen > self.timeout_s]
        for w in gone:
            del self.workers[w]
        # A world with a dead member runs no collective and no ring: it is not ready (placement
        # keeps to single workers) until the next generation forms without it.
        self.ready -= set(gone)
        self.sweep_fusion(now)
        for key in [k for k, (_, seen) in self.services.items() if now - seen > self.timeout_s]:
            del self.services[key]
        return gone

    def live_workers(self) -> list[WorkerHeartbeat]:
        return [e.beat for e in self.workers.values() if not e.beat.draining]

    def model(self) -> ModelInfo | None:
        for e in self.workers.values():
            return e.beat.model
        return None

    def fusion_partition(self, key: str) -> str | None:
        """A fusion partition for a request, spread by a stable hash of its id."""
        parts = sorted(self.fusion)
        if not parts:
            return None
        return parts[sum(key.encode()) % len(parts)]

    # ---------------------------------------------------------------- the world
    def world_plan(self) -> WorldPlan | None:
        return plan_world(self.live_workers())

    def world_needs_reform(self) -> bool:
        """True when the world the live workers call for (members, backend) is not the current one."""
        plan = self.world_plan()
        if plan is None:
            return bool(self.members)
        return sorted(self.members) != list(plan.members) or self.backend != plan.backend

    def next_world(self) -> WorldForm | None:
        """A new generation over the planned members, with their devices' backend."""
        plan = self.world_plan()
        if plan is None:
            return None
        beats = {b.worker_id: b for b in self.live_workers()}
        # Above every generation a worker is in: a restarted scheduler (counting from 0) would
        # otherwise announce generations the workers ignore as older than the one they joined.
        self.generation = max([self.generation, *(b.world_generation for b in beats.values())]) + 1
        self.members = list(plan.members)
        self.backend = plan.backend
        self.ready, self.failed = set(), set()
        self.formed_at = time.monotonic()
        return WorldForm(generation=self.generation, members=self.members,
                         store_addr=beats[self.members[0]].store_addr, backend=plan.backend)  # type: ignore[arg-type]

    def device_change(self) -> WorldPlan | None:
        """The current plan, once each time the set of live workers left out for their device
        changes (to report it); None while it stays the same, or when no worker is live."""
        plan = self.world_plan()
        excluded = plan.excluded if plan is not None else ()
        if excluded == self.reported_excluded:
            return None
        self.reported_excluded = excluded
        return plan

    def on_ready(self, worker_id: str, generation: int, ok: bool) -> None:
        if generation != self.generation:
            return
        (self.ready if ok else self.failed).add(worker_id)

    @property
    def world_ready(self) -> bool:
        return bool(self.members) and self.ready == set(self.members)

    def world_rank(self, worker_id: str) -> int | None:
        if not self.world_ready or worker_id not in self.members:
            return None
        return self.members.index(worker_id)

    def status(self, queued_requests: int, queue: list[QueuedRequest], active_requests: int,
               now: float | None = None) -> StatusReply:
        """`ringserve.v1.status`: the live workers (with their prefix-cache tiers' use), the world
        and every service instance heard from, with the scheduler's own waiting (for a worker or
        in the queue) and running requests."""
        now = time.monotonic() if now is None else now
        model = self.model()
        return StatusReply(
            model=model.name if model else None,
            workers=[WorkerStatus(worker_id=e.beat.worker_id, device=e.beat.device, busy=e.beat.busy,
                                  active_requests=e.beat.active_requests, kv_tokens=e.beat.kv_tokens,
                                  kv_capacity_tokens=e.beat.kv_capacity_tokens,
                                  resident_pages=e.beat.resident_pages, resident_bytes=e.beat.resident_bytes,
                                  host_tier_bytes=e.beat.host_tier_bytes,
                                  host_tier_limit_bytes=e.beat.host_tier_limit_bytes,
                                  last_seen_s=round(now - e.last_seen, 3))
                     for e in self.workers.values()],
            queued_requests=queued_requests,
            queue=queue,
            active_requests=active_requests,
            world_generation=self.generation,
            world_ready=self.world_ready,
            world_members=self.members,
            world_backend=self.backend,
            services=[ServiceStatus(service=service, instance=instance, draining=draining, last_seen_s=round(age, 3))
                      for service, instance, draining, age in self.service_instances(now)],
        )
