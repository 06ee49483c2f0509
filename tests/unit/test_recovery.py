"""Recovery by recomputation (issue 11 items 1 and 2) without NATS: the resumed request's prompt,
length and id, when a request may run again, the runner continuing a request on a new plan (the
client sees each token once and the reply is that of one undisturbed run), the scheduler's retry
(placed on a survivor under a new id, bounded, cancellable while it waits), the registry no longer
calling a world with a dead member ready, and a lost fusion partition: its rings' runs stopped
(by the sweep, or told from a failed merge by the partition's heartbeats) and re-run on a live
partition or on one worker."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.scheduler.admission import Admission
from services.scheduler.api import ApiError
from services.scheduler.main import SchedulerApp
from services.scheduler.world_keeper import WorldKeeper
from services.scheduler.recovery import (Loss, RecoveryCause, RecoveryOutcome, attempt_id, continuation, may_recover,
                                         remaining_request, resumed_prompt)
from services.scheduler.recovery_run import Recovery
from services.scheduler.runner import RequestRunner, RequestState
from services.scheduler.stops import StopChecker
from shared.messages import ErrorCode, GenerateRequest, KVQuant, PrefillCommand, PrefillResult, TokenEvent, TokenItem
from shared.metrics import RingserveMetrics
from shared.settings import Settings
from tests.unit.test_prefill_abort import PROMPT, ring_plan
from tests.unit.test_registry import beat, registry

MAX_NEW = 5
EOS = 2


# ------------------------------------------------------------------------------------ pure parts
def test_the_resumed_prompt_is_the_prompt_then_the_tokens_so_far():
    assert resumed_prompt([1, 2, 3], [7, 8]) == [1, 2, 3, 7, 8]
    assert resumed_prompt([1, 2, 3], []) == [1, 2, 3]  # lost in prefill: the same prompt again


def test_the_resumed_request_asks_only_for_the_tokens_still_due():
    req = GenerateRequest(input_ids=[1, 2], max_new_tokens=MAX_NEW, temperature=0.5, seed=3, top_k=4)
    resumed = remaining_request(req, 2)
    assert resumed.max_new_tokens == MAX_NEW - 2
    # the same sampling, and the original request is untouched
    assert (resumed.temperature, resumed.seed, resumed.top_k, resumed.input_ids) == (0.5, 3, 4, [1, 2])
    assert req.max_new_tokens == MAX_NEW
    with pytest.raises(ValueError):
        remaining_request(req, MAX_NEW)  # all its tokens: it has ended


def test_attempt_ids_keep_the_first_run_under_the_request_id():
    assert attempt_id("abc", 0) == "abc"
    assert attempt_id("abc", 1) == "abc~r1" and attempt_id("abc", 2) == "abc~r2"


def test_may_recover_is_bounded_and_never_after_a_cancel_or_during_a_drain():
    assert may_recover(0, 1, cancelled=False, draining=False)
    assert not may_recover(1, 1, cancelled=False, draining=False)
    assert not may_recover(0, 0, cancelled=False, draining=False)  # recovery switched off
    assert not may_recover(0, 2, cancelled=True, draining=False)
    assert not may_recover(0, 2, cancelled=False, draining=True)


# ------------------------------------------------------------------------------------ the runner
class ScriptedPort:
    """Workers whose leader answers the prefill with the next scripted token and then publishes
    the following ones; `stall_after` tokens into a run it publishes no more (a dead leader)."""

    instance = "scheduler-test"
    events_subject = "tokens.test"

    def __init__(self, tokens: list[int], stall_after: int | None = None):
        self.tokens = tokens
        self.stall_after = stall_after
        self.commands: list[PrefillCommand] = []
        self.watched: list[str] = []
        self.released: list[tuple[str, str]] = []
        self.queues: dict[str, asyncio.Queue] = {}
        self.produced = 0  # tokens handed out over all runs: where the script goes on

    async def prefill(self, worker_id, cmd: PrefillCommand) -> PrefillResult:
        self.commands.append(cmd)
        if cmd.member != cmd.plan.leader():
            return PrefillResult(request_id=cmd.plan.request_id, member=cmd.member, ok=True)
        first = self.tokens[self.produced]
        self.produced += 1
        queue = self.queues[cmd.plan.request_id]
        for index in range(1, cmd.decode.max_new_tokens):
            if self.stall_after is not None and index >= self.stall_after:
                self.stall_after = None  # the next run's leader is alive
                break
            queue.put_nowait(TokenItem(request_id=cmd.plan.request_id, index=index, token_id=self.tokens[self.produced]))
            self.produced += 1
        return PrefillResult(request_id=cmd.plan.request_id, member=cmd.member, ok=True, token_id=first)

    def watch(self, request_id):
        self.watched.append(request_id)
        return self.queues.setdefault(request_id, asyncio.Queue())

    def unwatch(self, request_id):
        self.queues.pop(request_id, None)

    async def release(self, worker_id, request_id):
        self.released.append((worker_id, request_id))

    async def abort(self, worker_id, request_id):
        pass


async def test_a_resumed_run_prefills_the_tokens_so_far_and_streams_only_new_ones():
    tokens = [7, 8, 9, 10, 11]
    port = ScriptedPort(tokens, stall_after=3)  # the first ring's leader dies after 3 tokens
    events: list = []

    async def emit(event):
        events.append(event)

    state = RequestState(request_id="r1", prompt_ids=PROMPT, request=GenerateRequest(input_ids=PROMPT, max_new_tokens=MAX_NEW))
    runner = RequestRunner(state, port, StopChecker(None, []), {EOS}, emit, token_timeout_s=5)
    first = asyncio.create_task(runner.run(ring_plan(2, "r1")))
    while len(runner.output_ids) < 3:
        await asyncio.sleep(0.001)
    first.cancel()  # what the world loop does when a ring member's heartbeats stop
    with pytest.raises(asyncio.CancelledError):
        await first
    assert sorted(port.released) == [("w0", "r1"), ("w1", "r1")]  # a failed run: every member is told

    resumed = resumed_prompt(PROMPT, runner.output_ids)
    plan = ring_plan(1, attempt_id("r1", 1), tokens=len(resumed))
    reply = await asyncio.wait_for(runner.run(plan), 5)

    cmd = port.commands[-1]
    assert cmd.plan.request_id == "r1~r1" and cmd.input_ids == PROMPT + [7, 8, 9]
    assert cmd.decode.max_new_tokens == MAX_NEW - 3 and cmd.sampling.temperature == 0.0
    assert port.watched == ["r1", "r1~r1"] and port.released[-1] == ("w0", "r1~r1")
    # one undisturbed run's reply: every token, the original prompt's length
    assert reply.output_ids == tokens and reply.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(PROMPT) and reply.usage.completion_tokens == MAX_NEW
    assert reply.request_id == "r1" and reply.placement.workers == ["w0"]
    # the client saw each token once, in order
    streamed = [(e.index, e.token_id) for e in events if isinstance(e, TokenEvent)]
    assert streamed == list(enumerate(tokens))


# ------------------------------------------------------------------------------------ the registry
def test_a_world_that_lost_a_member_is_not_ready_until_it_re_forms():
    reg = registry(beat("w-a"), beat("w-b"))
    form = reg.next_world()
    for w in form.members:
        reg.on_ready(w, form.generation, True)
    assert reg.world_ready and reg.world_rank("w-a") == 0
    reg.on_worker(beat("w-a"), now=104.0)
    assert reg.sweep(now=106.5) == ["w-b"]
    # placement keeps to single workers: no ring over a dead member's world
    assert not reg.world_ready and reg.world_rank("w-a") is None
    form = reg.next_world()
    reg.on_ready("w-a", form.generation, True)
    assert reg.world_ready and form.members == ["w-a"]


# ------------------------------------------------------------------------------------ the scheduler's retry
def scheduler(*beats, max_recoveries: int = 1, **settings):
    """The parts of the scheduler a recovery uses (no NATS, no model)."""
    app = object.__new__(SchedulerApp)
    app.settings = Settings(max_recoveries=max_recoveries, **settings)
    app.registry = registry(*beats, now=time.monotonic())
    app.draining = False
    app.runners = {}
    app.tracer = trace.get_tracer("test")
    app.admission = Admission(app.settings, app.registry, app.tracer)
    app.world = WorldKeeper(app.registry, None, app.settings, app.runners)  # no bus: nothing is published
    app.recovery = Recovery(app.admission, app.world, app.settings, app.tracer, lambda: app.draining)
    return app


def lost_runner(produced: list[int]) -> RequestRunner:
    state = RequestState(request_id="r1", prompt_ids=PROMPT, request=GenerateRequest(input_ids=PROMPT, max_new_tokens=MAX_NEW))
    runner = RequestRunner(state, ScriptedPort([]), StopChecker(None, []), {EOS}, None)
    runner.output_ids = list(produced)
    state.plan = ring_plan(2, "r1")
    runner.lost = Loss(RecoveryCause.WORKER, ("w1",))
    return runner


async def test_a_recovery_places_the_resumed_request_on_a_survivor_under_a_new_id():
    app = scheduler(beat("w0"))
    runner = lost_runner([7, 8, 9])
    plan = await app.recovery.rerun(runner, KVQuant.NONE, 0)
    assert plan.request_id == "r1~r1" and plan.workers == ["w0"] and plan.prompt_tokens == len(PROMPT) + 3
    # the dead plan no longer counts as a ring (the world may re-form) and its loss is handled
    assert runner.s.plan is None and runner.lost is None and runner.recovery_cause == RecoveryCause.WORKER


async def test_no_recovery_left_or_no_worker_left_is_unavailable():
    runner = lost_runner([7])
    with pytest.raises(ApiError) as err:
        await scheduler(beat("w0"), max_recoveries=1).recovery.rerun(runner, KVQuant.NONE, 1)
    assert err.value.code == ErrorCode.UNAVAILABLE and "workers lost: ['w1']" in err.value.message
    with pytest.raises(ApiError) as err:
        await scheduler().recovery.rerun(lost_runner([7]), KVQuant.NONE, 0)
    assert err.value.code == ErrorCode.UNAVAILABLE and "recovery failed" in err.value.message


async def test_a_cancel_while_the_recovery_waits_for_room_ends_it():
    full = beat("w0").model_copy(update={"kv_tokens": 1000, "kv_capacity_tokens": 1000})
    app = scheduler(full)
    runner = lost_runner([7])
    waiting = asyncio.create_task(app.recovery.rerun(runner, KVQuant.NONE, 0))
    while not app.admission.waiting:
        await asyncio.sleep(0.01)
    runner.s.cancelled = True
    assert await asyncio.wait_for(waiting, 5) is None
    assert app.admission.waiting == 0
    app.admission.close()
    assert await scheduler(beat("w0")).recovery.rerun(runner, KVQuant.NONE, 0) is None  # cancelled before: no wait


# ------------------------------------------------------------------------------------ the metric
def test_recoveries_are_counted_by_outcome():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = RingserveMetrics(provider.get_meter("test"))
    metrics.record_recovery(RecoveryOutcome.COMPLETED, RecoveryCause.WORKER)
    metrics.record_recovery(RecoveryOutcome.COMPLETED, RecoveryCause.WORKER)
    metrics.record_recovery(RecoveryOutcome.FAILED, RecoveryCause.WORKER)
    metrics.record_recovery(RecoveryOutcome.COMPLETED, RecoveryCause.FUSION)
    points = [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == "ringserve_request_recoveries" for p in m.data.data_points]
    assert {(p.attributes["cause"], p.attributes["outcome"]): p.value for p in points} == {
        ("worker", "completed"): 2, ("worker", "failed"): 1, ("fusion", "completed"): 1}
    provider.shutdown()


async def test_a_recovery_waits_for_the_world_of_the_survivors_to_place_a_ring():
    app = scheduler(beat("w0"), beat("w2"))
    form = app.registry.next_world()  # forming: not ready yet
    runner = lost_runner([7])
    recovering = asyncio.create_task(app.recovery.rerun(runner, KVQuant.NONE, 0))
    await asyncio.sleep(0.2)
    assert not recovering.done()
    for w in form.members:
        app.registry.on_ready(w, form.generation, True)
    plan = await asyncio.wait_for(recovering, 5)
    assert app.registry.world_ready and plan.request_id == "r1~r1"


def test_the_span_says_whether_a_resumed_run_continues_identically():
    assert continuation(GenerateRequest(input_ids=[1])) == "greedy"
    assert continuation(GenerateRequest(input_ids=[1], temperature=0.7, seed=3)) == "seeded"
    assert continuation(GenerateRequest(input_ids=[1], temperature=0.7)) == "unseeded"


# ------------------------------------------------------------------------------------ a lost fusion partition
def test_the_sweep_returns_silent_fusion_partitions_but_never_a_draining_one():
    reg = registry()
    reg.on_fusion("p0", draining=False, now=100.0)
    reg.on_fusion("p1", draining=False, now=104.0)
    reg.on_fusion("p2", draining=False, now=100.0)
    reg.on_fusion("p2", draining=True, now=101.0)  # draining: still serves its requests, takes no new ones
    assert reg.sweep_fusion(now=105.5) == ["p0"]
    assert not reg.fusion_live("p0") and reg.fusion_live("p1") and not reg.fusion_live("p2")
    assert reg.fusion_seen_since("p1", 104.0) and not reg.fusion_seen_since("p1", 104.5)
    assert reg.sweep_fusion(now=105.5) == [] and reg.fusion_partition("r1") == "p1"


def running_ring(app, request_id: str, size: int = 2, partition: str = "p0", fusion: str = "bus") -> RequestRunner:
    """A runner whose run is under way on a ring merged by `partition`, with a task to cancel."""
    state = RequestState(request_id=request_id, prompt_ids=PROMPT,
                         request=GenerateRequest(input_ids=PROMPT, max_new_tokens=MAX_NEW))
    runner = RequestRunner(state, ScriptedPort([]), StopChecker(None, []), {EOS}, None)
    state.plan = ring_plan(size, request_id).model_copy(update={"fusion_partition": partition, "fusion": fusion})
    runner.running = True
    runner.task = asyncio.create_task(asyncio.sleep(60))
    app.runners[request_id] = runner
    return runner


async def test_the_runs_merged_on_a_lost_partition_are_stopped_as_fusion_losses():
    app = scheduler(beat("w0"), beat("w1"))
    lost = running_ring(app, "a")
    others = [running_ring(app, "b", partition="p1"), running_ring(app, "c", size=1),
              running_ring(app, "d", fusion="collective")]
    failed = running_ring(app, "e")
    failed.running = False  # already failed: its own error handling decides (fusion_lost)
    app.world._stop_runs_on_fusion({"p0"})
    await asyncio.sleep(0)
    assert lost.lost == Loss(RecoveryCause.FUSION, ("p0",)) and lost.task.cancelled()
    assert lost.lost.describe() == "fusion partition lost: ['p0']"
    for runner in [*others, failed]:
        assert runner.lost is None and not runner.task.done(), runner.s.request_id
        runner.task.cancel()
    assert app.world.rings_active()  # "b" and "d" still run; the dead ring "a" does not count


async def test_a_failed_merge_is_a_fusion_loss_only_when_the_partition_falls_silent():
    app = scheduler(beat("w0"), beat("w1"), heartbeat_timeout_s=0.5, heartbeat_interval_s=0.25)
    app.registry.timeout_s = app.settings.heartbeat_timeout_s
    runner = running_ring(app, "a")
    runner.task.cancel()
    unavailable = ApiError(ErrorCode.UNAVAILABLE, "worker failed: no responders", "a")
    app.registry.on_fusion("p0", draining=False)

    async def beats(n: int):
        for _ in range(n):
            await asyncio.sleep(0.05)
            app.registry.on_fusion("p0", draining=False)

    # alive: its next heartbeat comes after the failure, the error stands
    alive = asyncio.create_task(beats(3))
    assert not await app.world.fusion_lost(runner, unavailable) and runner.lost is None
    await alive
    # another code, or a ring of one, is never a fusion loss (no wait)
    assert not await app.world.fusion_lost(runner, ApiError(ErrorCode.INTERNAL, "x", "a"))

    async def sweeps():  # as the world loop does
        while True:
            await asyncio.sleep(0.05)
            app.registry.sweep_fusion()

    # silent: the sweep drops it within the heartbeat timeout
    sweeping = asyncio.create_task(sweeps())
    assert await asyncio.wait_for(app.world.fusion_lost(runner, unavailable), 5)
    assert runner.lost == Loss(RecoveryCause.FUSION, ("p0",))
    sweeping.cancel()


async def test_a_fusion_loss_re_runs_on_a_live_partition_or_else_on_one_worker():
    app = scheduler(beat("w0"), beat("w1"), chunk_tokens=4)
    form = app.registry.next_world()
    for w in form.members:
        app.registry.on_ready(w, form.generation, True)
    app.registry.on_fusion("p1", draining=False)  # p0 died and was swept; p1 is live
    runner = lost_runner([7])
    runner.lost = Loss(RecoveryCause.FUSION, ("p0",))
    plan = await app.recovery.rerun(runner, KVQuant.NONE, 0)
    assert plan.size == 2 and plan.fusion_partition == "p1" and plan.request_id == "r1~r1"
    assert runner.recovery_cause == RecoveryCause.FUSION
    app.admission.release(plan.request_id)

    app.registry.fusion.clear()  # no partition left: a ring of one needs none
    runner = lost_runner([7, 8])
    runner.lost = Loss(RecoveryCause.FUSION, ("p1",))
    plan = await app.recovery.rerun(runner, KVQuant.NONE, 0)
    assert plan.size == 1 and plan.prompt_tokens == len(PROMPT) + 2
    with pytest.raises(ApiError) as err:  # bounded by the same max_recoveries
        runner.lost = Loss(RecoveryCause.FUSION, ("p1",))
        await app.recovery.rerun(runner, KVQuant.NONE, 1)
    assert err.value.code == ErrorCode.UNAVAILABLE and "fusion partition lost: ['p1']" in err.value.message


def test_a_run_id_is_never_a_client_id_and_the_kv_store_accepts_it():
    from pydantic import ValidationError

    from services.scheduler.preemption import preempted_run_id
    from shared.kv.messages import KVPinRequest

    for run_id in (attempt_id("foo", 1), preempted_run_id("foo", 2)):
        with pytest.raises(ValidationError):  # a client cannot send a request under a run's id
            GenerateRequest(prompt="x", request_id=run_id)
        assert KVPinRequest(request_id=run_id).request_id == run_id  # its workers' commits pin under it
    assert attempt_id("foo.r1", 1) != "foo.r1" and attempt_id("foo", 1) != "foo.r1"
