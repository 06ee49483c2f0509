"""The scheduler's view of the cluster, built from heartbeats: live workers, fusion partitions,
and the torch.distributed world (which workers are in it, in what rank order, which generation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.messages import ModelInfo, WorkerHeartbeat, WorldForm


@dataclass
class WorkerEntry:
    beat: WorkerHeartbeat
    last_seen: float


@dataclass
class Registry:
    timeout_s: float
    workers: dict[str, WorkerEntry] = field(default_factory=dict)
    fusion: dict[str, float] = field(default_factory=dict)  # partition -> last seen
    # The world the scheduler last formed, and which of its members have joined.
    generation: int = 0
    members: list[str] = field(default_factory=list)
    ready: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    formed_at: float = 0.0

    # ---------------------------------------------------------------- heartbeats
    def on_worker(self, beat: WorkerHeartbeat, now: float | None = None) -> None:
        self.workers[beat.worker_id] = WorkerEntry(beat, time.monotonic() if now is None else now)

    def on_fusion(self, partition: str, draining: bool, now: float | None = None) -> None:
        if draining:
            self.fusion.pop(partition, None)
        else:
            self.fusion[partition] = time.monotonic() if now is None else now

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop workers and fusion partitions that went silent; return the workers dropped."""
        now = time.monotonic() if now is None else now
        gone = [w for w, e in self.workers.items() if now - e.last_seen > self.timeout_s]
        for w in gone:
            del self.workers[w]
        for p in [p for p, seen in self.fusion.items() if now - seen > self.timeout_s]:
            del self.fusion[p]
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
    def world_needs_reform(self) -> bool:
        """True when the live workers are not exactly the current world's members."""
        return sorted(self.members) != sorted(w.worker_id for w in self.live_workers())

    def next_world(self, backend: str) -> WorldForm | None:
        live = sorted(self.live_workers(), key=lambda b: b.worker_id)
        if not live:
            return None
        self.generation += 1
        self.members = [b.worker_id for b in live]
        self.ready, self.failed = set(), set()
        self.formed_at = time.monotonic()
        return WorldForm(generation=self.generation, members=self.members, store_addr=live[0].store_addr,
                         backend=backend)  # type: ignore[arg-type]

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
