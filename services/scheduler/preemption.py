"""Preemption by recomputation under KV memory pressure (issue 13 item 3): a request whose worker
ran out of KV pages is paused and run again when a worker has room; it does not fail.

How a pool fills: admission keeps room for each request's prompt plus its decode reserve
(placement.decode_reserve: all of max_new_tokens unless admission_decode_reserve_tokens
overcommits on purpose), but another scheduler instance may place on the same worker before its
heartbeat says so, and rings' members grow unevenly. When a step finds no free page for a request,
the worker fails that request alone with `overloaded` (services/worker/errors.py: on a worker that
code means a full KV pool and nothing else), frees its pages, and the other requests there keep
decoding.

Which request is preempted: the one whose step could not get a page (vLLM v1 preempts the most
recently admitted running request instead). The worker has already dropped it, so choosing it
costs nothing, needs no view of the worker's other requests and no second stop on a healthy one;
with requests admitted around the same time the two rules mostly pick the same request.

What happens to it: its run is released on every member (its pages are free), and it waits in
admission's queue again with the resumed prompt (recovery.py: the prompt and every token it
produced, asking only for the tokens still due), aging from its first arrival so fresh arrivals do
not starve it. It runs again under a new id on the workers (`<id>~p<n>`, which `ringserve status`
shows while it waits). The client sees each token once and one run's reply (the runner continues
the request as for a recovery); greedy and seeded sampled tokens are identical (recovery.py).

Bounded: at most `max_preemptions` per request (counted apart from worker-loss recoveries), then
`overloaded` as before. Why recompute rather than park the KV in Redis: docs/RELIABILITY.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from shared.messages import ErrorCode, KVQuant, RingPlan
from shared.metrics import RingserveMetrics
from shared.settings import Settings
from services.scheduler.admission import Admission
from services.scheduler.api import ApiError
from services.scheduler.recovery import continuation, may_run_again, remaining_request, resumed_prompt

log = structlog.get_logger("scheduler")
# A preempted request's next run as the workers know it: a fresh id keeps its earlier run's
# leftovers (late tokens, a release still on its way) apart. Recoveries use ".r" (recovery.py).
PREEMPTED_SEPARATOR = "~p"  # "~" is not in a client id (RequestId): a run id never equals one


class PoolFull(ApiError):
    """A worker had no KV page left for this run (`overloaded` from its prefill or a decode step)."""

    def __init__(self, message: str, request_id: str | None, worker: str):
        super().__init__(ErrorCode.OVERLOADED, message, request_id)
        self.worker = worker


def worker_error(code: ErrorCode, message: str, request_id: str, worker: str) -> ApiError:
    """The error of a run that `worker` failed with `code`: PoolFull (preemptible) for `overloaded`."""
    if code == ErrorCode.OVERLOADED:
        return PoolFull(message, request_id, worker)
    return ApiError(code, message, request_id)


def preempted_run_id(request_id: str, preemption: int) -> str:
    """The id of the run that follows the request's `preemption`-th preemption (1-based)."""
    return f"{request_id}{PREEMPTED_SEPARATOR}{preemption}"


may_preempt = may_run_again  # bounded by max_preemptions


def monotonic_of(perf_counter_time: float) -> float:
    """A time.perf_counter() instant on the time.monotonic() clock (admission's), by its age."""
    return time.monotonic() - (time.perf_counter() - perf_counter_time)


class Preemption:
    """Puts a preempted request back in admission's queue and hands back its next run's plan."""

    def __init__(self, admission: Admission, settings: Settings, tracer, metrics: RingserveMetrics,
                 draining: Callable[[], bool]):
        self.admission = admission
        self.settings = settings
        self.tracer = tracer
        self.metrics = metrics
        self.draining = draining

    async def requeue(self, runner, quant: KVQuant, preemptions: int, full: PoolFull) -> RingPlan | None:
        """The plan of the next run of `runner`'s request, preempted after `preemptions` earlier
        preemptions because `full.worker`'s pool was full; None when the client cancelled it
        meanwhile. Raises `full` (`overloaded`) when it may not run again. The run that failed
        must already be released on its workers (the runner does it)."""
        s = runner.s
        if s.plan is not None:
            self.admission.release(s.plan.request_id)  # the failed run holds no room
        s.plan = None
        if s.cancelled:
            return None
        produced = len(runner.output_ids)
        if not may_preempt(preemptions, self.settings.max_preemptions, s.cancelled, self.draining()):
            why = "scheduler shutting down" if self.draining() else f"preempted {preemptions} times, the limit"
            raise ApiError(ErrorCode.OVERLOADED, f"{full.message} ({why})", s.request_id) from None
        count = preemptions + 1
        self.metrics.record_preemption()
        prompt = resumed_prompt(s.prompt_ids, runner.output_ids)
        with self.tracer.start_as_current_span("scheduler.preempt", attributes={
                "request_id": s.request_id, "preemption.count": count, "preemption.worker": full.worker,
                "preemption.tokens_so_far": produced, "resume.sampling": continuation(s.request),
                "prompt_tokens": len(prompt)}) as span:
            log.warning("request_preempted", worker=full.worker, tokens_so_far=produced, count=count,
                        max_preemptions=self.settings.max_preemptions, prompt_tokens=len(prompt),
                        sampling=continuation(s.request))
            plan = await self.admission.wait_for_placement(
                preempted_run_id(s.request_id, count), len(prompt), len(prompt) - runner.prefix_cached_tokens,
                remaining_request(s.request, produced), quant, lambda: s.cancelled,
                ages_from=monotonic_of(s.arrival))
            if plan is not None:
                span.set_attribute("ring.size", plan.size)
                log.info("request_placed", workers=plan.workers, chunk_tokens=plan.chunk_tokens,
                         prompt_tokens=len(prompt), preemption=count)
            return plan
