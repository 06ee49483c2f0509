"""Admission: from a checked request to a RingPlan. A request waits (bounded) for a live worker,
then, when the workers that could hold it are full, in the wait queue (queue.py's order) until
workers with room are free. Placement sees the workers as their heartbeats and this scheduler's
own placements tell.

No NATS here: the registry and a tracer come in, so tests drive it directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from shared.messages import ErrorCode, GenerateRequest, KVQuant, ModelInfo, QueuedRequest, RingPlan
from shared.settings import Settings
from services.scheduler.api import ApiError
from services.scheduler.placement import (WorkerLoad, choose_workers, chunk_tokens_for, decode_reserve, fits_cluster,
                                          member_tokens, one_worker_tokens, plan_ring, windowed_need)
from services.scheduler.queue import WaitQueue, Waiter
from services.scheduler.registry import Registry

log = structlog.get_logger("scheduler")
# How often a request waiting for a live worker looks again.
WORKER_POLL_S = 0.05
# How often the wait queue retries its placements (room frees as requests end and heartbeats say so).
PLACEMENT_POLL_S = 0.05
# The partition of a request no fusion service merges for (a worker holds it alone).
NO_FUSION_PARTITION = ""
QUEUE_REASON = "no workers with room"
# status and span figures: milliseconds are plenty
WAITED_DIGITS = 3


@dataclass
class _Candidate:
    """What placing a waiting request needs, and where its outcome goes."""

    prompt_tokens: int
    request: GenerateRequest
    quant: KVQuant
    outcome: asyncio.Future  # the RingPlan, or the error that refused it
    prefer: str | None = None  # the worker that may hold its cached blocks


class Admission:
    def __init__(self, settings: Settings, registry: Registry, tracer,
                 on_dequeued: Callable[[float], None] = lambda waited_s: None):
        self.settings = settings
        self.registry = registry
        self.tracer = tracer
        self.on_dequeued = on_dequeued  # seconds a placed request waited in the queue (a metric)
        self.queue = WaitQueue(settings.admission_aging_tokens_per_s)
        self._candidates: dict[str, _Candidate] = {}
        # The plans of this scheduler's requests from placement to their end, each with the decode
        # tokens reserved for it (decode_reserve): they count in the loads before any heartbeat shows them.
        self._placed: dict[str, tuple[RingPlan, int]] = {}
        # The KV a placed request that frees behind its window holds at most on one worker
        # (placement.windowed_need): what it counts for there instead of its prompt + decode.
        self._windowed: dict[str, int] = {}
        self._waiting_for_worker = 0
        self._retry_task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a worker or for room (the queue depth gauge and status)."""
        return self._waiting_for_worker + len(self.queue)

    async def wait_for_model(self, request_id: str) -> ModelInfo:
        """Wait (bounded) for a live worker; refuse when too many requests already wait."""
        model = self.registry.model() if self.registry.live_workers() else None
        if model is not None:
            return model
        if self.waiting >= self.settings.max_queued_requests:
            raise ApiError(ErrorCode.OVERLOADED, "too many requests are waiting for workers", request_id)
        self._waiting_for_worker += 1
        log.info("request_waiting", reason="no_worker", waiting=self.waiting,
                 timeout_s=self.settings.heartbeat_timeout_s)
        try:
            deadline = time.monotonic() + self.settings.heartbeat_timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(WORKER_POLL_S)
                if self.registry.live_workers() and (model := self.registry.model()) is not None:
                    return model
        finally:
            self._waiting_for_worker -= 1
        raise ApiError(ErrorCode.UNAVAILABLE, "no worker is available", request_id)

    # ------------------------------------------------------------------------------ loads, one plan
    def worker_loads(self) -> list[WorkerLoad]:
        """Live workers as placement sees them. KV held: the larger of the heartbeat's count and
        what this scheduler's own placed requests will hold there (heartbeats lag a new placement)."""
        placed = list(self._placed.values())
        in_ring = {w for plan, _ in placed if plan.size > 1 for w in plan.workers}
        requests: dict[str, int] = {}
        planned: dict[str, int] = {}
        for request_id, (plan, max_new_tokens) in self._placed.items():
            # each member comes to hold its prompt rows, or an even share once decode adds up
            even = -(-(plan.prompt_tokens + max_new_tokens) // plan.size)
            windowed = self._windowed.get(request_id) if plan.size == 1 else None
            for w, rows in zip(plan.workers, member_tokens(plan)):
                requests[w] = requests.get(w, 0) + 1
                planned[w] = planned.get(w, 0) + one_worker_tokens(max(rows, even), windowed)
        return [WorkerLoad(worker_id=b.worker_id, world_rank=self.registry.world_rank(b.worker_id),
                           in_ring=b.worker_id in in_ring, active_requests=requests.get(b.worker_id, 0),
                           kv_tokens=max(b.kv_tokens, planned.get(b.worker_id, 0)), capacity_tokens=b.kv_capacity_tokens)
                for b in self.registry.live_workers()]

    def place(self, request_id: str, prompt_tokens: int, req: GenerateRequest, quant: KVQuant,
              prefer: str | None = None) -> RingPlan | None:
        """A plan for the request now, or None when the workers that could hold it are busy.
        `prefer`: a worker that may hold the prompt's cached blocks, chosen when it can be."""
        loads = self.worker_loads()
        if not loads:
            raise ApiError(ErrorCode.UNAVAILABLE, "no worker is available", request_id)
        total = prompt_tokens + req.max_new_tokens
        model = self.registry.model()
        windowed = windowed_need(req, model, self.settings) if model is not None else None
        # A request held by one worker merges with nobody: only rings on the bus need a fusion service.
        partition = self.registry.fusion_partition(request_id)
        rings = self.registry.world_ready and (partition is not None or self.settings.fusion == "collective")
        alone = one_worker_tokens(total, windowed)
        if not rings and partition is None and not any(w.capacity_tokens is None or w.capacity_tokens >= alone
                                                       for w in loads):
            raise ApiError(ErrorCode.UNAVAILABLE, f"{total} tokens of KV need a ring of workers, and no fusion "
                           "service is available to merge its decode", request_id)
        if not fits_cluster(prompt_tokens, req.max_new_tokens, loads, self.settings, self.registry.world_ready,
                            windowed):
            raise ApiError(ErrorCode.TOO_LONG, f"{total} tokens of KV (prompt + max_new_tokens) do not fit the KV "
                           f"capacity of {len(loads)} workers (max_ring_size {self.settings.max_ring_size or 'all'})",
                           request_id)
        chunk = chunk_tokens_for(prompt_tokens, self.settings)
        # A collective-fusion ring exchanges partials point-to-point: it needs the world too.
        ring = choose_workers(prompt_tokens, chunk, loads, self.settings, rings,
                              decode_reserve(req.max_new_tokens, self.settings), prefer, windowed)
        if not ring:
            return None
        if windowed is not None:
            self._windowed[request_id] = windowed
        return plan_ring(request_id, prompt_tokens, ring, self.settings, self.registry.generation,
                         partition or NO_FUSION_PARTITION, quant)

    def release(self, request_id: str) -> None:
        """The request ended (or never ran): its plan no longer holds room."""
        self._placed.pop(request_id, None)
        self._windowed.pop(request_id, None)

    # ------------------------------------------------------------------------------ the wait queue
    def admit_waiting(self) -> None:
        """Place waiting requests in the queue's order while each can be placed. The first that
        cannot holds back those after it: room that frees then goes to it, not to one behind
        it that happens to fit, which is what lets aging bring a long prompt through."""
        for waiter in self.queue.order(time.monotonic()):
            candidate = self._candidates[waiter.request_id]
            try:
                plan = self.place(waiter.request_id, candidate.prompt_tokens, candidate.request, candidate.quant,
                                  candidate.prefer)
            except Exception as exc:  # refused now (e.g. its workers left): that request fails alone
                self._settle(waiter, exc)
                continue
            if plan is None:
                return
            self._placed[waiter.request_id] = (plan, decode_reserve(candidate.request.max_new_tokens, self.settings))
            self.queue.admitted(waiter)
            self._settle(waiter, plan)

    def _settle(self, waiter: Waiter, outcome: RingPlan | BaseException) -> None:
        self.queue.remove(waiter.request_id)
        future = self._candidates.pop(waiter.request_id).outcome
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    async def wait_for_placement(self, request_id: str, prompt_tokens: int, prefill_tokens: int,
                                 req: GenerateRequest, quant: KVQuant, cancelled: Callable[[], bool],
                                 prefer: str | None = None, ages_from: float | None = None) -> RingPlan | None:
        """Place now when the request comes first in the queue's order and fits, else wait in the
        queue (bounded by the request timeout and max_queued_requests): a long prompt never
        falls back onto a worker it would overfill. None when the request is cancelled while
        it waits. `prefill_tokens`: the prompt tokens no cached block covers (its queue order).
        `ages_from`: a request that ran before (preempted, recovered) waits again, aging from its
        first arrival (monotonic) and never refused for the queue's length (it was admitted)."""
        # Refusals (too long for any ring, no fusion service) come at once, before any wait.
        plan = self.place(request_id, prompt_tokens, req, quant, prefer)
        if plan is not None and not len(self.queue):
            self._placed[request_id] = (plan, decode_reserve(req.max_new_tokens, self.settings))
            return plan
        waiter = self.queue.add(request_id, prefill_tokens, time.monotonic(), ages_from)
        outcome = asyncio.get_running_loop().create_future()
        self._candidates[request_id] = _Candidate(prompt_tokens, req, quant, outcome, prefer)
        try:
            self.admit_waiting()  # others wait: it goes now only if the queue's order puts it first
            if outcome.done():
                return outcome.result()
            if ages_from is None and self.waiting > self.settings.max_queued_requests:  # this request counted
                raise ApiError(ErrorCode.OVERLOADED, "too many requests are waiting for workers", request_id)
            return await self._wait(waiter, outcome, cancelled)
        finally:
            if request_id in self.queue:  # left early: refused, cancelled or timed out
                self.queue.remove(request_id)
                self._candidates.pop(request_id, None)
            elif outcome.done() and not outcome.cancelled():
                outcome.exception()  # read, so an outcome nobody awaited is not reported as lost

    async def _wait(self, waiter: Waiter, outcome: asyncio.Future, cancelled: Callable[[], bool]) -> RingPlan | None:
        log.info("request_queued", reason=QUEUE_REASON, prompt_tokens=self._candidates[waiter.request_id].prompt_tokens,
                 prefill_tokens=waiter.prefill_tokens, place=waiter.place_at_entry, waiting=len(self.queue))
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_while_waiting())
        # The wait shows in the request's trace (the queue depth gauge counts it).
        with self.tracer.start_as_current_span("scheduler.queue", attributes={
                "request_id": waiter.request_id, "reason": QUEUE_REASON, "queue.place": waiter.place_at_entry,
                "queue.prefill_tokens": waiter.prefill_tokens}) as span:
            while not outcome.done():
                await asyncio.wait({outcome}, timeout=PLACEMENT_POLL_S)
                if cancelled():
                    span.set_attribute("cancelled", True)
                    return None
            waited_s = round(time.monotonic() - waiter.enqueued_at, WAITED_DIGITS)
            span.set_attributes({"queue.waited_s": waited_s, "queue.overtaken_by": waiter.overtaken_by})
            plan = outcome.result()  # a refusal raises here
            log.info("request_dequeued", waited_s=waited_s, place=waiter.place_at_entry,
                     overtaken_by=waiter.overtaken_by, prefill_tokens=waiter.prefill_tokens)
            self.on_dequeued(time.monotonic() - waiter.enqueued_at)
            return plan

    async def _retry_while_waiting(self) -> None:
        """One retry loop for the whole queue, so the queue's order decides who gets room."""
        while len(self.queue):
            await asyncio.sleep(PLACEMENT_POLL_S)
            self.admit_waiting()

    def close(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()

    def queued(self) -> list[QueuedRequest]:
        """The waiting requests in the order they will be placed, as `ringserve status` shows them."""
        now = time.monotonic()
        return [QueuedRequest(request_id=w.request_id, place=place, prefill_tokens=w.prefill_tokens,
                              waited_s=round(now - w.enqueued_at, WAITED_DIGITS))
                for place, w in enumerate(self.queue.order(now), start=1)]
