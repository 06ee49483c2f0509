"""The worker's decode loop: continuous batching over the requests decoding here.

One step for every request decoding here, again and again: requests join after their prefill
(`join`, on the ring's leader) or with their leader's first tick (`follow`, on the other ring
members) and leave between steps. Prefills and other compute work queue in the same compute
thread between steps. The next step is handed to the compute thread as soon as the last one's
tokens are known, and the tokens are published while it runs.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from shared import subjects
from shared.bus import Bus
from shared.errors import error_text
from shared.messages import DecodePlan, DecodeResult, DecodeStep, DecodeTokens, PrefillCommand, TokenItem
from shared.metrics import RingserveMetrics
from shared.settings import Settings
from services.worker.batcher import DecodeBatcher, followers
from services.worker.engine import WorkerEngine
from services.worker.errors import decode_error_code
from services.worker.fusion_client import FusionClient
from services.worker.shard_persist import ShardPersister

log = structlog.get_logger("worker")
# After an unexpected error in the loop, it starts again this much later.
DECODE_LOOP_RESTART_S = 0.1

# end_request(request_id, followers, finished plan or None): drop its KV here and on its followers
EndRequest = Callable[[str, list[str], DecodePlan | None], Awaitable[None]]


class DecodeLoop:
    def __init__(self, engine: WorkerEngine, batcher: DecodeBatcher, bus: Bus, settings: Settings, worker_id: str,
                 tracer: trace.Tracer, metrics: RingserveMetrics, fusion: FusionClient,
                 compute: Callable[..., Awaitable], keep: Callable[[asyncio.Task], None],
                 end_request: EndRequest, shards: ShardPersister | None):
        self.engine = engine
        self.batcher = batcher
        self.bus = bus
        self.settings = settings
        self.worker_id = worker_id
        self.tracer = tracer
        self.metrics = metrics
        self.fusion = fusion
        self.compute = compute  # compute(fn, *args): fn on the compute thread
        self.keep = keep  # a background task kept referenced until done
        self.end_request = end_request
        self.shards = shards
        self.wake = asyncio.Event()  # something to step: a request joined, a tick came, a prefill ended
        self.trace_context: dict[str, otel_context.Context] = {}  # request -> the trace its decode spans join
        # H2O importance of stored blocks is measured on every N-th decode step (0: off)
        self.importance_every = settings.kv_importance_every if settings.kv_store_enabled else 0

    def join(self, cmd: PrefillCommand, token_id: int) -> None:
        """After the leader's prefill: it decodes the request from now on (its followers wait for
        its ticks). A first token that already ends the request ends it here and on the followers."""
        plan = cmd.plan
        rows = [sum(s.end - s.start for s in segs) for segs in plan.segments]
        if self.batcher.lead(plan, cmd.sampling, cmd.decode, token_id, rows):
            self.wake.set()
        else:
            self.keep(asyncio.create_task(self.end_request(plan.request_id, followers(plan), None)))

    def follow(self, tick: DecodeStep) -> None:
        """A ring leader's tick for a request held here: run that step here too (or end it)."""
        self.trace_context.setdefault(tick.request_id, otel_context.get_current())
        self.batcher.follow(tick)
        self.wake.set()

    async def run(self) -> None:
        """Steps until cancelled; an unexpected error restarts the loop, never ends it."""
        while True:
            try:
                await self._steps()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop every later request's decode
                log.exception("decode_loop_failed")
                await asyncio.sleep(DECODE_LOOP_RESTART_S)

    async def _steps(self) -> None:
        running = await self._start_step()
        while True:
            if running is None:
                await self.wake.wait()
                running = await self._start_step()
                continue
            steps, step = running
            results = await step
            items, finished = self.batcher.on_results(steps, results)
            running = await self._start_step()
            await self._publish_tokens(items)
            for end in finished:  # in the background: the release queues behind compute work
                self.keep(asyncio.create_task(self.end_request(end.request_id, end.followers, end.decode)))
            if self.shards is not None:
                for result in results:
                    if result.ok:
                        self.shards.grew(result.request_id)

    async def _publish_tokens(self, items: list[tuple[str, TokenItem]]) -> None:
        """One message per scheduler instance with all its requests' tokens of the step."""
        by_subject: dict[str, list[TokenItem]] = {}
        for subject, item in items:
            by_subject.setdefault(subject, []).append(item)
        for subject, batch in by_subject.items():
            try:
                await self.bus.publish(subject, DecodeTokens(worker_id=self.worker_id, items=batch))
            except Exception as exc:  # the scheduler's runner times out those requests
                log.warning("decode_tokens_publish_failed", subject=subject, error=error_text(exc))

    async def _start_step(self) -> tuple[list[DecodeStep], asyncio.Future] | None:
        """The next step's batch, its ticks sent and its compute started; None: nothing to step."""
        self.wake.clear()
        steps, ticks, ended = self.batcher.next_batch(set(self.engine.requests))
        for rid in ended:  # followed requests their leader finished
            self.keep(asyncio.create_task(self.end_request(rid, [], None)))
        if not steps:
            return None
        for workers, tick in ticks:  # the ring runs the step together
            await self._send_tick(workers, tick)
        return steps, asyncio.ensure_future(self._decode_batch(steps))

    async def _send_tick(self, workers: list[str], tick: DecodeStep) -> None:
        """A step (or the end) of a request led here, to the other ring members, in its trace."""
        context = self.trace_context.get(tick.request_id)
        token = otel_context.attach(context) if context is not None else None
        try:
            for worker in workers:
                await self.bus.publish(subjects.worker_inbox(worker, "decode"), tick)
        except Exception as exc:  # the members' fusion (or the leader's own) times the step out
            log.warning("decode_tick_publish_failed", request_id=tick.request_id, error=error_text(exc))
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _decode_batch(self, steps: list[DecodeStep]) -> list[DecodeResult]:
        collective = self.settings.fusion == "collective"
        # Decode is traced by sampled steps (step 0 and every trace_decode_every-th, as in the
        # fusion service): a span per token per worker would cost more than it tells.
        traced = [s for s in steps if s.step % self.settings.trace_decode_every == 0]
        parent = self.trace_context.get(traced[0].request_id if traced else steps[0].request_id)
        span = None
        if traced:
            span = self.tracer.start_span("worker.decode", context=parent, attributes={
                "batch": len(steps), "request_ids": [s.request_id for s in steps], "step": traced[0].step})
            parent = trace.set_span_in_context(span, parent)
        fuse = functools.partial(self.fusion.fuse, context=parent or otel_context.get_current())
        t0 = time.perf_counter()
        try:
            results = await self.compute(self.engine.decode, steps, fuse, collective, self.importance_every)
        except Exception as exc:
            log.warning("decode_failed", requests=[s.request_id for s in steps], error=error_text(exc))
            if span is not None:
                span.record_exception(exc)
            code = decode_error_code(exc)
            results = [DecodeResult(request_id=s.request_id, member=-1, step=s.step, ok=False,
                                    error_code=code, error=error_text(exc)) for s in steps]
        finally:
            if span is not None:
                span.end()
        self.metrics.record_decode(sum(r.ok for r in results), time.perf_counter() - t0)
        return results
