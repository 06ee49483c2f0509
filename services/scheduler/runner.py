"""One request from admission to reply: place it, prefill on its ring, then follow the tokens the
ring leader's decode loop publishes: stream them, check stop strings, end the request (release).

A request whose ring lost a worker or its fusion partition may run again (recovery.py): the same runner then runs a new
plan, prefilling the prompt and the tokens it already has and decoding only the ones still due,
so the client's stream and the reply go on as if nothing happened. A request whose worker's KV
pool filled is run again the same way (preemption.py): `run` raises PoolFull for it.

The runner talks to workers only through `WorkerPort` (a few awaitables and a token queue), so its
control flow is tested without NATS and the scheduler's main wires the port to the bus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from opentelemetry import trace
from pydantic import BaseModel

from shared.attention.pattern import KeyPattern, attention_sparsity
from shared.bus import inject_headers
from shared.kv.keys import BlockRef
from shared.messages import (
    DecodePlan,
    DoneEvent,
    ErrorCode,
    GenerateReply,
    GenerateRequest,
    Placement,
    PrefillCommand,
    PrefillResult,
    ProgressEvent,
    RingPlan,
    SamplingParams,
    Timings,
    TokenEvent,
    TokenItem,
    Usage,
)
from services.scheduler.api import ApiError
from services.scheduler.preemption import worker_error
from services.scheduler.prefix import member_blocks
from services.scheduler.recovery import Loss, RecoveryCause, resumed_prompt
from services.scheduler.stops import StopChecker


class WorkerPort(Protocol):
    instance: str  # this scheduler instance, which owns the requests it runs
    events_subject: str  # where ring leaders publish the tokens of this scheduler's requests

    async def prefill(self, worker_id: str, cmd: PrefillCommand) -> PrefillResult: ...
    async def release(self, worker_id: str, request_id: str) -> None: ...
    async def abort(self, worker_id: str, request_id: str) -> None: ...
    # The request's tokens as the leader publishes them; None wakes the runner (a cancel).
    def watch(self, request_id: str) -> asyncio.Queue[TokenItem | None]: ...
    def unwatch(self, request_id: str) -> None: ...


log = structlog.get_logger("scheduler")
Emit = Callable[[BaseModel], Awaitable[None]]
# The global provider's tracer (set up by the service); a no-op until then.
tracer = trace.get_tracer("ringserve.scheduler.runner")


@dataclass
class RequestState:
    request_id: str
    request: GenerateRequest
    prompt_ids: list[int]
    arrival: float = field(default_factory=time.perf_counter)
    placed_at: float | None = None
    first_token_at: float | None = None
    cancelled: bool = False
    plan: RingPlan | None = None
    reply: str = ""  # the client's reply subject, and its encoding
    content_type: str = ""


def sampling_of(req: GenerateRequest) -> SamplingParams:
    return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                          logprobs=req.logprobs)


def member_ids(plan: RingPlan, prompt_ids: list[int], member: int) -> list[int]:
    return [t for seg in plan.segments[member] for t in prompt_ids[seg.start : seg.end]]


class RequestRunner:
    def __init__(self, state: RequestState, port: WorkerPort, stops: StopChecker, eos_ids: set[int],
                 emit: Emit | None, cached_tokens: int = 0, kv_blocks: list[BlockRef] | None = None,
                 token_timeout_s: float = 90.0, layer_patterns: list[KeyPattern | None] | None = None):
        self.s = state
        self.port = port
        self.stops = stops
        self.eos_ids = eos_ids | set(state.request.stop_token_ids)
        self.emit = emit  # streaming events, None when the client did not ask for a stream
        # Leading prompt positions the KV store holds, and the prompt's full blocks (prefix.py).
        # After prefill: the positions the members actually loaded (a member whose load missed computed).
        self.cached_tokens = cached_tokens
        self.prefix_cached_tokens = cached_tokens  # what every run loads: the admission's lookup
        self.kv_blocks = kv_blocks or []
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.task: asyncio.Task | None = None  # set by the scheduler; cancelled when its ring dies
        # Set when a ring member or the fusion partition died under a running run (world_keeper.py):
        # the run is dead, a recovery may follow (recovery_run.py clears it).
        self.lost: Loss | None = None
        self.recovery_cause: RecoveryCause | None = None  # why it last ran again (the metric's label)
        self.running = False  # inside run(): a loss cancels the task only then, not its error handling
        self.span: trace.Span = trace.INVALID_SPAN  # the request's root span, set by the scheduler
        self.prefilling = False  # the prefill commands are out and not all answered
        self.token_timeout_s = token_timeout_s  # the leader silent this long: it is gone
        # each layer's attention pattern, for usage.attention_sparsity (empty: not known, 0.0)
        self.layer_patterns = layer_patterns or []
        self._tokens: asyncio.Queue[TokenItem | None] | None = None

    async def cancel(self) -> bool:
        """The client cancelled the request. Decode stops before its next step; a prefill under
        way is aborted on every ring member (they stop together at a layer boundary and answer
        `cancelled`). True when the prefill was told to abort."""
        s = self.s
        s.cancelled = True
        if self._tokens is not None:
            self._tokens.put_nowait(None)  # a runner waiting for the next token stops now
        if not self.prefilling or s.plan is None:
            return False
        await asyncio.gather(*(self.port.abort(w, s.plan.request_id) for w in s.plan.workers), return_exceptions=True)
        return True

    async def run(self, plan: RingPlan) -> GenerateReply:
        """Run the request on `plan`'s ring, from the tokens it has so far (none on a first run).
        The workers know this run by plan.request_id (a resumed run's differs, recovery.py)."""
        s = self.s
        s.plan = plan
        s.placed_at = s.placed_at or time.perf_counter()  # queue_ms: the first placement's wait
        self._tokens = self.port.watch(plan.request_id)
        ended = False
        self.running = True
        try:
            finish = await self._generate(plan)
            ended = True
        finally:
            self.running = False
            self.port.unwatch(plan.request_id)
            # Ended normally, the leader ends the request on its ring (after the ticks it already
            # sent, so no member is left waiting in a step); after a failure, each member is told.
            workers = [plan.workers[plan.leader()]] if ended else plan.workers
            await asyncio.gather(*(self.port.release(w, plan.request_id) for w in workers), return_exceptions=True)
        return self.reply(finish, plan)

    def reply(self, finish: str, plan: RingPlan | None) -> GenerateReply:
        """The reply so far; `plan` None for a request cancelled before it was placed."""
        s = self.s
        now = time.perf_counter()
        placed_at = s.placed_at or now
        return GenerateReply(
            request_id=s.request_id,
            output_ids=self.output_ids,
            text=self.stops.text if self.stops.has_tokenizer else None,
            finish_reason=finish,
            logprobs=self.logprobs if s.request.logprobs else None,
            usage=Usage(prompt_tokens=len(s.prompt_ids), completion_tokens=len(self.output_ids),
                        cached_tokens=self.cached_tokens,
                        attention_sparsity=attention_sparsity(self.layer_patterns, len(s.prompt_ids),
                                                              len(self.output_ids)) if self.output_ids else 0.0),
            timings=Timings(
                queue_ms=round((placed_at - s.arrival) * 1000, 3),
                ttft_ms=round(((s.first_token_at or now) - s.arrival) * 1000, 3),
                total_ms=round((now - s.arrival) * 1000, 3),
            ),
            placement=None if plan is None else Placement(workers=plan.workers, chunk_tokens=plan.chunk_tokens,
                                                          chunks=plan.units),
        )

    async def on_progress(self, layers_done: int, layers: int) -> None:
        if self.emit is not None:
            total = len(self.s.prompt_ids)
            await self.emit(ProgressEvent(request_id=self.s.request_id, done_tokens=total * layers_done // layers,
                                          total_tokens=total))

    async def _generate(self, plan: RingPlan) -> str:
        s = self.s
        sampling = sampling_of(s.request)
        # A resumed run prefills the tokens produced so far after the prompt and numbers its own
        # tokens from 0: `produced` maps them onto the request's.
        produced = len(self.output_ids)
        prompt_ids = resumed_prompt(s.prompt_ids, self.output_ids)
        decode = DecodePlan(max_new_tokens=s.request.max_new_tokens - produced, stop_token_ids=sorted(self.eos_ids),
                            events=self.port.events_subject, owner=self.port.instance, trace=inject_headers(),
                            reply=s.reply, reply_content_type=s.content_type)
        cmds = [
            PrefillCommand(plan=plan, member=m, input_ids=member_ids(plan, prompt_ids, m), sampling=sampling,
                           cached_tokens=self.prefix_cached_tokens, kv_blocks=member_blocks(self.kv_blocks, plan.segments[m]),
                           decode=decode, attention=s.request.attention)
            for m in range(plan.size)
        ]
        if s.cancelled:  # before its prefill was sent: no worker has heard of it
            return "cancelled"
        self.prefilling = True
        try:
            with tracer.start_as_current_span("scheduler.prefill", attributes={
                    "request_id": s.request_id, "ring.size": plan.size, "prompt_tokens": len(prompt_ids),
                    "resumed_tokens": produced}) as span:
                log.info("prefill_started", request_id=s.request_id, workers=len(plan.workers),
                         prompt_tokens=len(prompt_ids), cached_tokens=self.prefix_cached_tokens, resumed_tokens=produced)
                results = await asyncio.gather(*(self.port.prefill(w, c) for w, c in zip(plan.workers, cmds)))
                aborted = prefill_aborted(results, s.cancelled)
                span.set_attribute("prefill.aborted", aborted)
        except BaseException:
            # Timed out, cut off by a drain, or failed on a member: a prefill still running on the
            # others stops at its next layer boundary instead of holding the ring for nothing.
            await asyncio.gather(*(self.port.abort(w, plan.request_id) for w in plan.workers), return_exceptions=True)
            raise
        finally:
            self.prefilling = False
        self.cached_tokens = sum(r.cached_tokens for r in results)
        if aborted:  # the members stopped together and kept nothing: no token, nothing to decode
            return "cancelled"
        self._check(plan, results)
        leader = results[plan.leader()]
        finish = await self._accept(leader.token_id, leader.logprob)
        # The leader decodes on by itself from here; its tokens come in order, one per step.
        while finish is None:
            if s.cancelled:
                return "cancelled"
            item = await self._next_token()
            if item is None:
                continue  # woken by a cancel
            if item.error_code is not None:  # the leader publishes the tokens, and its failures
                raise worker_error(item.error_code, f"worker failed: {item.error}", s.request_id,
                                   plan.workers[plan.leader()])
            if produced + item.index != len(self.output_ids):
                raise ApiError(ErrorCode.INTERNAL, f"token {produced + item.index} came when {len(self.output_ids)} "
                               "was due", s.request_id)
            finish = await self._accept(item.token_id, item.logprob)
        return finish

    async def _next_token(self) -> TokenItem | None:
        try:
            return await asyncio.wait_for(self._tokens.get(), self.token_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(ErrorCode.UNAVAILABLE, f"no token from the ring leader in {self.token_timeout_s:g} s",
                           self.s.request_id) from None

    async def _accept(self, token: int | None, logprob: float | None) -> str | None:
        """Record one generated token; return a finish reason when generation should end."""
        if token is None:
            raise ApiError(ErrorCode.INTERNAL, "the ring leader returned no token", self.s.request_id)
        s = self.s
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
            # Prefill is over and decode begins (unless this token already ends the request).
            log.info("first_token", request_id=s.request_id, cached_tokens=self.cached_tokens,
                     ttft_ms=round((s.first_token_at - s.arrival) * 1000, 3))
        self.output_ids.append(token)
        self.logprobs.append(float(logprob) if logprob is not None else 0.0)
        delta, hit_stop = self.stops.push(token)
        if self.emit is not None:
            await self.emit(TokenEvent(request_id=s.request_id, index=len(self.output_ids) - 1, token_id=token,
                                       text=delta if self.stops.has_tokenizer else None,
                                       logprob=self.logprobs[-1] if s.request.logprobs else None))
        if token in self.eos_ids or hit_stop:
            return "stop"
        if len(self.output_ids) >= s.request.max_new_tokens:
            return "length"
        return None

    def _check(self, plan: RingPlan, results: list[PrefillResult]) -> None:
        for r in results:
            if not r.ok:
                code = r.error_code or ErrorCode.INTERNAL
                raise worker_error(code, f"worker failed: {r.error}", self.s.request_id, plan.workers[r.member])


def prefill_aborted(results: list[PrefillResult], cancelled: bool) -> bool:
    """Whether a prefill ended because the client cancelled it: some member answered `cancelled`
    (on a ring all do, at the same layer) and the request was indeed cancelled. A `cancelled`
    answer the client never asked for is an error like any other failed member."""
    return cancelled and any(r.cancelled for r in results)


def done_event(reply: GenerateReply) -> DoneEvent:
    return DoneEvent(**reply.model_dump())
