"""Preemption by recomputation under KV memory pressure (issue 13 item 3) without NATS: which
worker errors preempt, the bound, the decode reserve, a returning request's age in the queue, the
runner continuing a request whose worker's pool filled (each token once, one run's reply), and
the scheduler's requeue (a new id, the resumed prompt, counted, bounded, cancellable)."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.scheduler.admission import Admission
from services.scheduler.api import ApiError
from services.scheduler.placement import decode_reserve
from services.scheduler.preemption import PoolFull, Preemption, may_preempt, preempted_run_id, worker_error
from services.scheduler.queue import WaitQueue
from services.scheduler.recovery import resumed_prompt
from services.scheduler.runner import RequestRunner, RequestState
from services.scheduler.stops import StopChecker
from shared.messages import ErrorCode, GenerateRequest, KVQuant, PrefillCommand, PrefillResult, TokenEvent, TokenItem
from shared.metrics import RingserveMetrics
from shared.settings import Settings
from tests.unit.test_prefill_abort import PROMPT, ring_plan
from tests.unit.test_recovery import ScriptedPort
from tests.unit.test_registry import beat, registry

MAX_NEW = 6
EOS = 2
TOKENS = [7, 8, 9, 10, 11, 12]


# ------------------------------------------------------------------------------------ pure parts
def test_only_a_full_pool_preempts():
    full = worker_error(ErrorCode.OVERLOADED, "KV pool full", "r1", "w0")
    assert isinstance(full, PoolFull) and full.code == ErrorCode.OVERLOADED and full.worker == "w0"
    for code in (ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE):
        err = worker_error(code, "boom", "r1", "w0")
        assert not isinstance(err, PoolFull) and err.code == code


def test_preempted_runs_have_their_own_ids():
    assert preempted_run_id("abc", 1) == "abc~p1" and preempted_run_id("abc", 2) == "abc~p2"


def test_may_preempt_is_bounded_and_never_after_a_cancel_or_during_a_drain():
    assert may_preempt(0, 2, cancelled=False, draining=False)
    assert may_preempt(1, 2, cancelled=False, draining=False)
    assert not may_preempt(2, 2, cancelled=False, draining=False)
    assert not may_preempt(0, 0, cancelled=False, draining=False)  # preemption switched off
    assert not may_preempt(0, 2, cancelled=True, draining=False)
    assert not may_preempt(0, 2, cancelled=False, draining=True)


def test_the_decode_reserve_is_all_new_tokens_unless_capped():
    assert decode_reserve(100, Settings()) == 100
    assert decode_reserve(100, Settings(admission_decode_reserve_tokens=16)) == 16
    assert decode_reserve(8, Settings(admission_decode_reserve_tokens=16)) == 8
    assert decode_reserve(100, Settings(admission_decode_reserve_tokens=0)) == 0


def test_a_returning_request_keeps_the_age_it_had_earned():
    queue = WaitQueue(aging_tokens_per_s=10.0)
    queue.add("fresh", prefill_tokens=50, now=100.0)
    # preempted: more to prefill (its prompt and tokens so far), but it arrived 20 s ago
    queue.add("back~p1", prefill_tokens=200, now=100.0, ages_from=80.0)
    assert [w.request_id for w in queue.order(100.0)] == ["back~p1", "fresh"]
    queue.add("new~p1", prefill_tokens=200, now=100.0)  # the same without its age: behind
    assert [w.request_id for w in queue.order(100.0)] == ["back~p1", "fresh", "new~p1"]


# ------------------------------------------------------------------------------------ the runner
class FillingPort(ScriptedPort):
    """ScriptedPort whose leader's pool fills `full_after` tokens into the first run: it publishes
    an `overloaded` item where the next token would be (what a worker's failed decode step sends)."""

    def __init__(self, tokens: list[int], full_after: int):
        super().__init__(tokens, stall_after=full_after)
        self.full_after = full_after

    async def prefill(self, worker_id, cmd: PrefillCommand) -> PrefillResult:
        filling = self.stall_after is not None
        result = await super().prefill(worker_id, cmd)
        if filling and cmd.member == cmd.plan.leader():
            self.queues[cmd.plan.request_id].put_nowait(TokenItem(
                request_id=cmd.plan.request_id, index=self.full_after, error_code=ErrorCode.OVERLOADED,
                error="KV pool full: 1 pages asked, 0 of 8 free"))
        return result


def state(max_new: int = MAX_NEW) -> RequestState:
    return RequestState(request_id="r1", prompt_ids=PROMPT,
                        request=GenerateRequest(input_ids=PROMPT, max_new_tokens=max_new))


async def test_a_request_whose_pool_filled_continues_with_each_token_once():
    port = FillingPort(TOKENS, full_after=3)
    events: list = []

    async def emit(event):
        events.append(event)

    runner = RequestRunner(state(), port, StopChecker(None, []), {EOS}, emit, token_timeout_s=5)
    with pytest.raises(PoolFull) as err:
        await asyncio.wait_for(runner.run(ring_plan(1, "r1")), 5)
    assert err.value.worker == "w0" and runner.output_ids == TOKENS[:3]
    assert port.released == [("w0", "r1")]  # a failed run is released on its workers: its pages free

    plan = ring_plan(1, preempted_run_id("r1", 1), tokens=len(PROMPT) + 3)
    reply = await asyncio.wait_for(runner.run(plan), 5)
    cmd = port.commands[-1]
    assert cmd.plan.request_id == "r1~p1" and cmd.input_ids == resumed_prompt(PROMPT, TOKENS[:3])
    assert cmd.decode.max_new_tokens == MAX_NEW - 3
    assert reply.output_ids == TOKENS and reply.finish_reason == "length" and reply.request_id == "r1"
    assert reply.usage.prompt_tokens == len(PROMPT) and reply.usage.completion_tokens == MAX_NEW
    assert [(e.index, e.token_id) for e in events if isinstance(e, TokenEvent)] == list(enumerate(TOKENS))


class FullPrefillPort(ScriptedPort):
    """A ring whose second member has no page for its share of the prompt."""

    async def prefill(self, worker_id, cmd: PrefillCommand) -> PrefillResult:
        if cmd.member == 1:
            return PrefillResult(request_id=cmd.plan.request_id, member=1, ok=False,
                                 error_code=ErrorCode.OVERLOADED, error="KV pool full")
        return PrefillResult(request_id=cmd.plan.request_id, member=cmd.member, ok=True, token_id=7)


async def test_a_prefill_that_finds_the_pool_full_preempts_too():
    port = FullPrefillPort([])
    runner = RequestRunner(state(), port, StopChecker(None, []), {EOS}, None, token_timeout_s=5)
    with pytest.raises(PoolFull) as err:
        await runner.run(ring_plan(2, "r1"))
    assert err.value.worker == "w1" and runner.output_ids == []
    assert sorted(port.released) == [("w0", "r1"), ("w1", "r1")]


# ------------------------------------------------------------------------------------ the requeue
class Harness:
    def __init__(self, *beats, max_preemptions: int = 2, draining: bool = False):
        self.settings = Settings(max_preemptions=max_preemptions)
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.admission = Admission(self.settings, registry(*beats, now=time.monotonic()), trace.get_tracer("test"))
        self.preemption = Preemption(self.admission, self.settings, trace.get_tracer("test"),
                                     RingserveMetrics(self.provider.get_meter("test")), lambda: draining)

    def preemptions_counted(self) -> int:
        return sum(p.value for rm in self.reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                   for m in sm.metrics if m.name == "ringserve_request_preemptions" for p in m.data.data_points)

    def close(self):
        self.admission.close()
        self.provider.shutdown()


def preempted_runner(produced: list[int], admission: Admission) -> RequestRunner:
    runner = RequestRunner(state(), ScriptedPort([]), StopChecker(None, []), {EOS}, None)
    runner.output_ids = list(produced)
    runner.s.plan = ring_plan(1, "r1")
    admission._placed["r1"] = (runner.s.plan, MAX_NEW)  # as placed: it holds room until released
    return runner


def full(worker: str = "w0") -> PoolFull:
    return PoolFull("worker failed: KV pool full", "r1", worker)


async def test_a_preempted_request_is_placed_again_with_its_tokens_so_far():
    h = Harness(beat("w0"))
    runner = preempted_runner([7, 8, 9], h.admission)
    plan = await h.preemption.requeue(runner, KVQuant.NONE, 0, full())
    assert plan.request_id == "r1~p1" and plan.workers == ["w0"] and plan.prompt_tokens == len(PROMPT) + 3
    assert "r1" not in h.admission._placed and "r1~p1" in h.admission._placed  # the failed run holds no room
    assert runner.s.plan is None  # the runner's next run sets it
    assert h.preemptions_counted() == 1
    plan = await h.preemption.requeue(runner, KVQuant.NONE, 1, full())
    assert plan.request_id == "r1~p2" and h.preemptions_counted() == 2
    h.close()


async def test_past_the_bound_or_while_draining_it_fails_overloaded():
    h = Harness(beat("w0"), max_preemptions=2)
    with pytest.raises(ApiError) as err:
        await h.preemption.requeue(preempted_runner([7], h.admission), KVQuant.NONE, 2, full())
    assert err.value.code == ErrorCode.OVERLOADED and "preempted 2 times" in err.value.message
    assert h.preemptions_counted() == 0 and "r1" not in h.admission._placed
    h.close()
    h = Harness(beat("w0"), draining=True)
    with pytest.raises(ApiError) as err:
        await h.preemption.requeue(preempted_runner([7], h.admission), KVQuant.NONE, 0, full())
    assert err.value.code == ErrorCode.OVERLOADED and "shutting down" in err.value.message
    h.close()


async def test_a_preempted_request_waits_queued_from_its_arrival_and_a_cancel_ends_the_wait():
    busy = beat("w0").model_copy(update={"kv_tokens": 1000, "kv_capacity_tokens": 1000})
    h = Harness(busy)
    runner = preempted_runner([7], h.admission)
    runner.s.arrival = time.perf_counter() - 30.0  # it arrived 30 s ago
    waiting = asyncio.create_task(h.preemption.requeue(runner, KVQuant.NONE, 0, full()))
    while not h.admission.waiting:
        await asyncio.sleep(0.01)
    (queued,) = h.admission.queued()  # `ringserve status` shows it under its next run's id
    assert queued.request_id == "r1~p1" and queued.prefill_tokens == len(PROMPT) + 1
    waiter = h.admission.queue._waiters["r1~p1"]
    assert time.monotonic() - waiter.aging_start == pytest.approx(30.0, abs=1.0)
    runner.s.cancelled = True
    assert await asyncio.wait_for(waiting, 5) is None
    assert h.admission.waiting == 0
    h.close()


async def test_a_preempted_request_is_not_refused_for_the_queue_length():
    busy = beat("w0").model_copy(update={"kv_tokens": 1000, "kv_capacity_tokens": 1000})
    h = Harness(busy)
    h.settings.max_queued_requests = 1
    others = asyncio.create_task(h.admission.wait_for_placement(
        "other", 4, 4, GenerateRequest(input_ids=[1, 2, 3, 4], max_new_tokens=2), KVQuant.NONE, lambda: False))
    while not h.admission.waiting:
        await asyncio.sleep(0.01)
    runner = preempted_runner([7], h.admission)
    waiting = asyncio.create_task(h.preemption.requeue(runner, KVQuant.NONE, 0, full()))
    while h.admission.waiting < 2:
        await asyncio.sleep(0.01)
        assert not waiting.done(), waiting
    runner.s.cancelled = True
    assert await asyncio.wait_for(waiting, 5) is None
    others.cancel()
    h.close()
