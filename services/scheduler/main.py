"""The scheduler service: the public API (`ringserve.v1.generate|cancel|status`) and one
RequestRunner per request, recovered when its ring loses a worker or its fusion partition
(recovery.py, recovery_run.py) and preempted when its worker's KV pool fills (preemption.py). Admission
(waiting, loads, placement) is `admission.py`; the line to the workers is `port.py`; liveness and
the torch.distributed world are `world_keeper.py`.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.msg import Msg
from opentelemetry import trace
from pydantic import BaseModel

from shared import codec, subjects
from shared.checkpoint import resolve_checkpoint
from shared.kv.client import KVIndexClient
from shared.messages import (
    CancelReply,
    ErrorCode,
    FusionDrop,
    PrefillProgress,
)
from shared.metrics import OK_CODE, RingserveMetrics
from shared.errors import error_text
from shared.service import (ServiceApp, ServiceRuntime, drain_budget_s, main as service_main, serve,
                            wait_until)
from shared.settings import Settings
from services.scheduler.admission import Admission
from services.scheduler.api import (
    ApiError,
    check_fits_bus,
    check_limits,
    encode_reply,
    layer_patterns,
    new_request_id,
    parse_cancel,
    parse_generate,
)
from services.scheduler.block_homes import BlockHomes
from services.scheduler.identity import may_cancel, requester_of
from services.scheduler.placement import kv_quant_for
from services.scheduler.preemption import PoolFull, Preemption
from services.scheduler.port import BusWorkerPort
from services.scheduler.prefix import PrefixIndex
from services.scheduler.recovery import RecoveryOutcome
from services.scheduler.recovery_run import Recovery
from services.scheduler.registry import Registry
from services.scheduler.runner import RequestRunner, RequestState, done_event
from services.scheduler.stops import StopChecker
from services.scheduler.world_keeper import WorldKeeper

log = structlog.get_logger("scheduler")
# Non-owners answer a cancel this much later, so the owner's answer wins.
CANCEL_NOT_OWNER_DELAY_S = 0.25
# Request bodies and prompts this large are parsed and tokenized in a thread, off the event loop.
OFF_LOOP_BYTES = 64 * 1024
# Of the drain timeout, kept to answer requests a drain has to cut off.
DRAIN_REPLY_MARGIN_S = 1.0
DRAIN_STOP_TAIL_S = 0.1  # what stop() still does after the cut-off requests' replies


def load_tokenizer(settings: Settings):
    from shared.model.tokenizer import load_tokenizer as load

    return load(resolve_checkpoint(settings))


class SchedulerApp(ServiceApp):
    name = "scheduler"
    description = "ringserve public API: admission, placement, prefill and decode orchestration"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(timeout_s=settings.heartbeat_timeout_s)
        self.tokenizer = load_tokenizer(settings)
        self.runners: dict[str, RequestRunner] = {}
        self.claimed_ids: set[str] = set()  # ids of the requests being handled, from their first check
        self.requesters: dict[str, str | None] = {}  # request -> its tenant (identity.py), for cancel
        self.block_homes = BlockHomes(self.settings.placement_block_homes)  # cache-aware placement
        self.inflight: set[asyncio.Task] = set()  # every public request being handled, admission included
        self.draining = False

    # ------------------------------------------------------------------------------ wiring
    async def start(self, rt: ServiceRuntime) -> None:
        self.rt = rt
        self.port = BusWorkerPort(rt.bus, self.settings, rt.instance)
        await self.port.start()
        self.tracer = rt.telemetry.tracer
        self.prefix = PrefixIndex(KVIndexClient(rt.bus, self.settings), self.settings, self.tracer)
        self.metrics = RingserveMetrics(rt.telemetry.meter)
        self.admission = Admission(self.settings, self.registry, self.tracer, self.metrics.record_queue_time)
        self.metrics.watch_queue("scheduler", lambda: self.admission.waiting)
        self.preemption = Preemption(self.admission, self.settings, self.tracer, self.metrics, lambda: self.draining)
        bus = rt.bus
        self._generate_sub = await bus.subscribe(subjects.GENERATE, self._on_generate, queue=subjects.SERVICE_QUEUE)
        await bus.subscribe(subjects.STATUS, self._on_status, queue=subjects.SERVICE_QUEUE)
        await bus.subscribe(subjects.CANCEL, self._on_cancel)  # every instance: only the owner can cancel
        self.world = WorldKeeper(self.registry, bus, self.settings, self.runners)
        self.recovery = Recovery(self.admission, self.world, self.settings, self.tracer, lambda: self.draining)
        await self.world.start()
        self._world_task = asyncio.create_task(self.world.run())

    async def stop(self, rt: ServiceRuntime) -> None:
        """Drain: new requests go to the other scheduler instances (with none, the client's
        request finds no responder), running ones finish within the drain timeout, and those
        still running then are answered `unavailable` rather than left without a reply."""
        self.draining = True
        deadline = time.monotonic() + self.settings.drain_timeout_s  # stop() is cut off there
        # drain, not unsubscribe: requests already delivered to this instance are still handled
        await self._generate_sub.drain()
        log.info("scheduler_draining", requests=len(self.inflight))
        budget = max(0.0, drain_budget_s(self.settings) - DRAIN_REPLY_MARGIN_S)
        if not await wait_until(lambda: not self.inflight, budget):
            log.warning("drain_cancelling_requests", requests=len(self.inflight))
            for task in list(self.inflight):
                task.cancel()
            # The cut-off requests still release their workers and fusion partitions, then reply:
            # they get all the time left (the bus closes after stop() returns, losing a late reply).
            await wait_until(lambda: not self.inflight, max(0.0, deadline - time.monotonic() - DRAIN_STOP_TAIL_S))
        self._world_task.cancel()
        self.admission.close()

    # ------------------------------------------------------------------------------ status / cancel
    async def _on_status(self, msg: Msg) -> None:
        reply = self.registry.status(self.admission.waiting, self.admission.queued(), active_requests=len(self.runners))
        await self._respond(msg, reply, codec.public_content_type(msg.data or b"{", _ctype(msg)))

    async def _on_cancel(self, msg: Msg) -> None:
        content_type = codec.public_content_type(msg.data, _ctype(msg))
        try:
            req = parse_cancel(msg.data, content_type)
        except ApiError as err:
            await self._respond(msg, err.reply(), content_type)
            return
        runner = self.runners.get(req.request_id)
        if runner is None:
            await asyncio.sleep(CANCEL_NOT_OWNER_DELAY_S)
            await self._respond(msg, CancelReply(request_id=req.request_id, cancelled=False), content_type)
            return
        canceller = requester_of(msg.headers)
        if not may_cancel(self.requesters.get(req.request_id), canceller):
            # another tenant's request: answered as if it were not here, so ids are not probed
            log.warning("cancel_refused_other_tenant", request_id=req.request_id, canceller=canceller)
            await asyncio.sleep(CANCEL_NOT_OWNER_DELAY_S)
            await self._respond(msg, CancelReply(request_id=req.request_id, cancelled=False), content_type)
            return
        # Decode stops before its next step; a prefill under way is aborted on its ring members.
        aborting = await runner.cancel()
        with trace.use_span(runner.span, end_on_exit=False):
            log.info("request_cancelled", request_id=req.request_id, prefill_aborted=aborting)
        await self._respond(msg, CancelReply(request_id=req.request_id, cancelled=True), content_type)

    # ------------------------------------------------------------------------------ generate
    async def _on_generate(self, msg: Msg) -> None:
        # Each request runs in its own task: a slow or failing one never blocks the subscription.
        task = asyncio.create_task(self._generate(msg))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _generate(self, msg: Msg) -> None:
        content_type = codec.public_content_type(msg.data, _ctype(msg))
        request_id = None
        outcome = OK_CODE
        with self.tracer.start_as_current_span("scheduler.generate") as span:
            try:
                req, content_type = await off_loop_if_large(len(msg.data), parse_generate, msg.data, _ctype(msg),
                                                            self.settings)
                request_id = new_request_id(req)
                span.set_attribute("request_id", request_id)
                structlog.contextvars.bind_contextvars(request_id=request_id)
                log.info("request_received", stream=req.stream, max_new_tokens=req.max_new_tokens,
                         input="input_ids" if req.input_ids is not None else "prompt")
                # Claimed before the first await: two requests under one id would share its token
                # queue and placement, and the one that lost would never be answered.
                if request_id in self.claimed_ids:
                    raise ApiError(ErrorCode.INVALID_REQUEST, f"request_id {request_id!r} is already running", request_id)
                self.claimed_ids.add(request_id)
                try:
                    reply = await asyncio.wait_for(self._run(req, request_id, msg, content_type),
                                                   self.settings.request_timeout_s)
                finally:
                    self.claimed_ids.discard(request_id)
                with self.tracer.start_as_current_span("scheduler.reply", attributes={
                        "finish_reason": reply.finish_reason, "completion_tokens": len(reply.output_ids)}):
                    await self._respond(msg, done_event(reply) if req.stream else reply, content_type)
                log.info("request_done", finish=reply.finish_reason, tokens=len(reply.output_ids),
                         ttft_ms=reply.timings.ttft_ms, total_ms=reply.timings.total_ms,
                         workers=len(reply.placement.workers) if reply.placement else 0)
            except ApiError as err:
                outcome = err.code.value
                err.request_id = err.request_id or request_id
                # refused before its id was bound (a malformed body): name the client's id, if any
                unbound = {"request_id": err.request_id} if request_id is None and err.request_id else {}
                log.info("request_failed", code=err.code.value, message=err.message, **unbound)
                await self._respond(msg, err.reply(), content_type)
            except asyncio.TimeoutError:
                outcome = ErrorCode.TIMEOUT.value
                log.info("request_failed", code=outcome, message="request timed out")
                await self._respond(msg, ApiError(ErrorCode.TIMEOUT, "request timed out", request_id).reply(), content_type)
            except asyncio.CancelledError:
                if not self.draining:
                    raise
                # Cut off by a drain that ran out of time: the client still gets an answer.
                outcome = ErrorCode.UNAVAILABLE.value
                log.info("request_failed", code=outcome, message="scheduler shutting down")
                await self._respond(msg, ApiError(ErrorCode.UNAVAILABLE, "scheduler shutting down; retry",
                                                  request_id).reply(), content_type)
            except Exception as exc:  # never let one request take the service down
                outcome = ErrorCode.INTERNAL.value
                log.exception("request_crashed")
                span.record_exception(exc)
                await self._respond(msg, ApiError(ErrorCode.INTERNAL, error_text(exc), request_id).reply(), content_type)
            finally:
                self.metrics.record_request(outcome)
                structlog.contextvars.unbind_contextvars("request_id")

    async def _run(self, req, request_id: str, msg: Msg, content_type: str):
        # `inflight` holds this request too, and every one admitted before it
        if len(self.inflight) > self.settings.max_active_requests:
            raise ApiError(ErrorCode.OVERLOADED, f"{len(self.inflight) - 1} requests are running, the limit is "
                           f"{self.settings.max_active_requests}; retry later", request_id)
        model = await self.admission.wait_for_model(request_id)
        if req.input_ids is not None:
            prompt_ids = list(req.input_ids)
        elif self.tokenizer is None:
            raise ApiError(ErrorCode.UNSUPPORTED, "this model has no tokenizer: send input_ids", request_id)
        else:
            prompt_ids = await off_loop_if_large(len(req.prompt), self.tokenizer.encode, req.prompt)
        check_limits(req, prompt_ids, model, self.settings, request_id)
        check_fits_bus(prompt_ids, self.rt.bus.max_payload, self.settings, request_id)
        if req.stop and self.tokenizer is None:
            raise ApiError(ErrorCode.UNSUPPORTED, "stop strings need a tokenizer", request_id)
        log.info("request_admitted", prompt_tokens=len(prompt_ids), max_new_tokens=req.max_new_tokens)

        state = RequestState(request_id=request_id, request=req, prompt_ids=prompt_ids, reply=msg.reply or "",
                             content_type=content_type)
        quant = kv_quant_for(req, self.settings)
        # The prompt's cached blocks stay pinned until the request ends, however it ends.
        # K/V computed under a sparse pattern are not the full attention's: such requests neither
        # load nor store prompt blocks (until the store keys blocks by pattern: issue 12 item 4).
        cacheable = req.attention is None or req.attention.key_pattern() is None
        async with self.prefix.hold(request_id, model, prompt_ids, quant.value, cacheable) as hit:
            emit = (lambda event: self._respond(msg, event, content_type)) if req.stream else None
            runner = RequestRunner(state, self.port, StopChecker(self.tokenizer, req.stop),
                                   set() if req.ignore_eos else set(model.eos_token_ids),
                                   emit, cached_tokens=hit.cached_tokens, kv_blocks=hit.blocks,
                                   token_timeout_s=self.settings.fusion_timeout_s + self.settings.dist_timeout_s,
                                   layer_patterns=layer_patterns(req, model))
            runner.span = trace.get_current_span()  # scheduler.generate: a cancel is logged in its trace
            self.runners[request_id] = runner
            self.requesters[request_id] = requester_of(msg.headers)
            progress_sub = None
            runs: list[str] = []  # every id it runs under on the workers (a resumed run: its own)
            try:
                cached_hashes = [b.chain_hash for b in hit.blocks if b.end <= hit.cached_tokens]
                home = self.block_homes.home_of(cached_hashes)
                plan = await self.admission.wait_for_placement(
                    request_id, len(prompt_ids), len(prompt_ids) - hit.cached_tokens, req, quant,
                    lambda: runner.s.cancelled, prefer=home)
                if plan is None:  # cancelled while it waited for workers: nothing was sent to any
                    return runner.reply("cancelled", None)
                with self.tracer.start_as_current_span("scheduler.placement", attributes={
                    "ring.size": plan.size, "chunk_tokens": plan.chunk_tokens, "prompt_tokens": len(prompt_ids)}):
                    log.info("request_placed", workers=plan.workers, chunk_tokens=plan.chunk_tokens,
                             prompt_tokens=len(prompt_ids))
                runs.append(plan.request_id)
                if req.stream:
                    progress_sub = await self._follow_progress(progress_sub, plan.request_id, runner)
                runner.task = asyncio.current_task()
                if home is not None:
                    trace.get_current_span().set_attribute("placement.block_home", home)
                recoveries = preemptions = 0  # resumed runs started, by why (counted and bounded apart)
                try:
                    while True:
                        try:
                            reply = await runner.run(plan)
                            break
                        except asyncio.CancelledError:
                            await self._drop_fusion(plan)
                            if runner.lost is None:
                                raise
                            # The world loop cancelled the run because a ring member or its fusion
                            # partition died: not a cancel of this request, which goes on
                            # (recovered) or fails coded.
                            asyncio.current_task().uncancel()
                            plan = await self.recovery.rerun(runner, quant, recoveries)
                            recoveries += 1
                        except PoolFull as full:  # released on its workers: back to the queue
                            await self._drop_fusion(plan)
                            plan = await self.preemption.requeue(runner, quant, preemptions, full)
                            preemptions += 1
                        except ApiError as err:
                            await self._drop_fusion(plan)
                            # the leader's merge failed before the sweep noticed its fusion died
                            if not await self.world.fusion_lost(runner, err):
                                raise
                            plan = await self.recovery.rerun(runner, quant, recoveries)
                            recoveries += 1
                        if plan is None:  # cancelled while it waited for workers again
                            reply = runner.reply("cancelled", None)
                            break
                        runs.append(plan.request_id)
                        if req.stream:
                            progress_sub = await self._follow_progress(progress_sub, plan.request_id, runner)
                    if plan is not None and plan.size == 1 and hit.blocks and cacheable:
                        self.block_homes.record(plan.workers[0], [b.chain_hash for b in hit.blocks])
                except BaseException:
                    if runner.recovery_cause is not None:
                        self.metrics.record_recovery(RecoveryOutcome.FAILED, runner.recovery_cause)
                    raise
                if runner.recovery_cause is not None:
                    self.metrics.record_recovery(RecoveryOutcome.CANCELLED if reply.finish_reason == "cancelled"
                                                 else RecoveryOutcome.COMPLETED, runner.recovery_cause)
            finally:
                self.runners.pop(request_id, None)
                self.requesters.pop(request_id, None)
                self.admission.release(request_id)
                if runner.s.plan is not None:  # a resumed run's placement, under its own id
                    self.admission.release(runner.s.plan.request_id)
                if progress_sub is not None:
                    await self.rt.bus.unsubscribe(progress_sub)
                if hit.blocks:  # blocks a resumed run's workers stored are pinned to its own id
                    for run_id in runs[1:]:
                        await self.prefix.index.unpin(run_id)
        if reply.output_ids:  # a request cancelled during its prefill has no first token
            self.metrics.record_ttft(reply.timings.ttft_ms)
            self.metrics.record_request_attention_sparsity(reply.usage.attention_sparsity)
        if len(reply.output_ids) > 1:
            self.metrics.record_time_per_output_token(
                (reply.timings.total_ms - reply.timings.ttft_ms) / (len(reply.output_ids) - 1))
        return reply

    async def _follow_progress(self, sub, run_id: str, runner: RequestRunner):
        """The prefill progress of the request's current run (a resumed run has its own id)."""
        if sub is not None:
            await self.rt.bus.unsubscribe(sub)

        async def on_progress(p: PrefillProgress, _msg: Msg) -> None:
            await runner.on_progress(p.layers_done, p.layers)

        return await serve(self.rt.bus, subjects.progress(run_id), PrefillProgress, on_progress)

    async def _drop_fusion(self, plan) -> None:
        """Surviving ring members may wait on a merge that will never complete: end it now."""
        if plan.size > 1:
            await self.rt.bus.publish(subjects.fusion_drop(plan.fusion_partition), FusionDrop(request_id=plan.request_id))

    async def _respond(self, msg: Msg, message: BaseModel, content_type: str) -> None:
        if msg.reply:
            try:
                await self.rt.bus.publish_raw(msg.reply, encode_reply(message, content_type),
                                              headers={"Content-Type": content_type})
            except Exception as exc:  # a vanished client must not crash the request's task
                log.warning("reply_failed", error=error_text(exc))


async def off_loop_if_large(size: int, fn, *args):
    """fn(*args), in a thread when `size` (bytes or characters) is large: parsing or tokenizing a
    multi-megabyte body takes seconds, which on the event loop would stall every other request
    and the status and cancel handlers with it."""
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _ctype(msg: Msg) -> str | None:
    return (msg.headers or {}).get("Content-Type")


def main() -> None:
    service_main(SchedulerApp)


if __name__ == "__main__":
    main()
