"""Admission: from a checked request to a RingPlan. A request waits (bounded) for a live worker,
then for workers with room for it; placement sees the workers as their heartbeats and this
scheduler's own placements tell.

No NATS here: the registry, the running requests' plans and a tracer come in, so tests drive it
directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog

from shared.messages import ErrorCode, GenerateRequest, KVQuant, ModelInfo, RingPlan
from shared.settings import Settings
from services.scheduler.api import ApiError
from services.scheduler.placement import WorkerLoad, choose_workers, chunk_tokens_for, fits_cluster, member_tokens, plan_ring
from services.scheduler.registry import Registry

log = structlog.get_logger("scheduler")
# How often a request waiting for a live worker looks again.
WORKER_POLL_S = 0.05
# How often a request waiting for workers with room retries its placement.
PLACEMENT_POLL_S = 0.05
# The partition of a request no fusion service merges for (a worker holds it alone).
NO_FUSION_PARTITION = ""

# The plans of the requests this scheduler runs, each with its request's max_new_tokens.
PlacedPlans = Callable[[], Iterable[tuple[RingPlan, int]]]


class Admission:
    def __init__(self, settings: Settings, registry: Registry, tracer, placed: PlacedPlans):
        self.settings = settings
        self.registry = registry
        self.tracer = tracer
        self.placed = placed
        self.waiting = 0  # requests waiting for a worker or for room (the queue depth gauge)

    async def wait_for_model(self, request_id: str) -> ModelInfo:
        """Wait (bounded) for a live worker; refuse when too many requests already wait."""
        model = self.registry.model() if self.registry.live_workers() else None
        if model is not None:
            return model
        if self.waiting >= self.settings.max_queued_requests:
            raise ApiError(ErrorCode.OVERLOADED, "too many requests are waiting for workers", request_id)
        self.waiting += 1
        log.info("request_waiting", reason="no_worker", waiting=self.waiting,
                 timeout_s=self.settings.heartbeat_timeout_s)
        try:
            deadline = time.monotonic() + self.settings.heartbeat_timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(WORKER_POLL_S)
                if self.registry.live_workers() and (model := self.registry.model()) is not None:
                    return model
        finally:
            self.waiting -= 1
        raise ApiError(ErrorCode.UNAVAILABLE, "no worker is available", request_id)

    def worker_loads(self) -> list[WorkerLoad]:
        """Live workers as placement sees them. KV held: the larger of the heartbeat's count and
        what this scheduler's own placed requests will hold there (heartbeats lag a new placement)."""
        placed = list(self.placed())
        in_ring = {w for plan, _ in placed if plan.size > 1 for w in plan.workers}
        requests: dict[str, int] = {}
        planned: dict[str, int] = {}
        for plan, max_new_tokens in placed:
            # each member comes to hold its prompt rows, or an even share once decode adds up
            even = -(-(plan.prompt_tokens + max_new_tokens) // plan.size)
            for w, rows in zip(plan.workers, member_tokens(plan)):
                requests[w] = requests.get(w, 0) + 1
                planned[w] = planned.get(w, 0) + max(rows, even)
        return [WorkerLoad(worker_id=b.worker_id, world_rank=self.registry.world_rank(b.worker_id),
                           in_ring=b.worker_id in in_ring, active_requests=requests.get(b.worker_id, 0),
                           kv_tokens=max(b.kv_tokens, planned.get(b.worker_id, 0)), capacity_tokens=b.kv_capacity_tokens)
                for b in self.registry.live_workers()]

    def place(self, request_id: str, prompt_tokens: int, req: GenerateRequest, quant: KVQuant) -> RingPlan | None:
        """A plan for the request now, or None when the workers that could hold it are busy."""
        loads = self.worker_loads()
        if not loads:
            raise ApiError(ErrorCode.UNAVAILABLE, "no worker is available", request_id)
        total = prompt_tokens + req.max_new_tokens
        # A request held by one worker merges with nobody: only rings on the bus need a fusion service.
        partition = self.registry.fusion_partition(request_id)
        rings = self.registry.world_ready and (partition is not None or self.settings.fusion == "collective")
        if not rings and partition is None and not any(w.capacity_tokens is None or w.capacity_tokens >= total
                                                       for w in loads):
            raise ApiError(ErrorCode.UNAVAILABLE, f"{total} tokens of KV need a ring of workers, and no fusion "
                           "service is available to merge its decode", request_id)
        if not fits_cluster(prompt_tokens, req.max_new_tokens, loads, self.settings, self.registry.world_ready):
            raise ApiError(ErrorCode.TOO_LONG, f"{total} tokens of KV (prompt + max_new_tokens) do not fit the KV "
                           f"capacity of {len(loads)} workers (max_ring_size {self.settings.max_ring_size or 'all'})",
                           request_id)
        chunk = chunk_tokens_for(prompt_tokens, self.settings)
        # A collective-fusion ring exchanges partials point-to-point: it needs the world too.
        ring = choose_workers(prompt_tokens, chunk, loads, self.settings, rings, req.max_new_tokens)
        if not ring:
            return None
        return plan_ring(request_id, prompt_tokens, ring, self.settings, self.registry.generation,
                         partition or NO_FUSION_PARTITION, quant)

    async def wait_for_placement(self, request_id: str, prompt_tokens: int, req: GenerateRequest, quant: KVQuant,
                                 cancelled: Callable[[], bool]) -> RingPlan | None:
        """Place now, or queue until workers with room are free (bounded by the request timeout
        and max_queued_requests): a long prompt never falls back onto a worker it would overfill.
        None when the request is cancelled while it waits."""
        plan = self.place(request_id, prompt_tokens, req, quant)
        if plan is not None:
            return plan
        if self.waiting >= self.settings.max_queued_requests:
            raise ApiError(ErrorCode.OVERLOADED, "too many requests are waiting for workers", request_id)
        log.info("request_queued", reason="no workers with room", prompt_tokens=prompt_tokens)
        self.waiting += 1
        # The wait shows in the request's trace (the queue depth gauge counts it).
        with self.tracer.start_as_current_span("scheduler.queue", attributes={
                "request_id": request_id, "reason": "no workers with room"}) as span:
            try:
                while plan is None:
                    await asyncio.sleep(PLACEMENT_POLL_S)
                    if cancelled():
                        span.set_attribute("cancelled", True)
                        return None
                    plan = self.place(request_id, prompt_tokens, req, quant)
            finally:
                self.waiting -= 1
        return plan
