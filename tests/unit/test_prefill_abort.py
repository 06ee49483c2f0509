"""Cancelling a request while it is prefilling: the worker's abort flags, the scheduler runner
forwarding the cancel to the ring and ending with `cancelled`, and the engine stopping at a layer
boundary, alone and on a real gloo ring whose members agree to stop at the same layer."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.scheduler.api import ApiError
from services.scheduler.runner import RequestRunner, RequestState, prefill_aborted
from services.scheduler.stops import StopChecker
from services.worker.aborts import AbortFlags
from tests.helpers.engines import make_engine
from services.worker.engine import WorkerEngine
from services.worker.errors import PrefillAborted
from shared.attention.layout import zigzag_segments
from shared.messages import (
    ErrorCode,
    GenerateRequest,
    PrefillCommand,
    PrefillResult,
    RingPlan,
    SamplingParams,
    Segment,
)
from tests.unit.test_engine_batch_decode import tiny_model

PROMPT = [(i * 11 + 5) % 64 for i in range(23)]
LAYERS = 3  # tiny_model
DIST_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------ AbortFlags
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_abort_flags_are_per_request_and_cleared():
    flags = AbortFlags(ttl_s=10)
    assert not flags.is_set("a")
    flags.request("a")
    flags.request("a")  # the scheduler may forward a cancel twice
    assert flags.is_set("a") and not flags.is_set("b") and len(flags) == 1
    flags.clear("a")
    flags.clear("never-set")
    assert not flags.is_set("a") and len(flags) == 0


def test_a_stale_abort_expires_and_never_stops_a_reused_request_id():
    clock = FakeClock()
    flags = AbortFlags(ttl_s=10, clock=clock)
    flags.request("late")  # arrived after its prefill ended and its release
    clock.now += 10
    assert flags.is_set("late")
    clock.now += 0.5
    assert not flags.is_set("late")  # expired even before anything prunes it
    flags.request("other")  # pruned on the next abort
    assert len(flags) == 1 and flags.is_set("other")


# ------------------------------------------------------------------------------------ runner
def ring_plan(size: int, request_id: str = "r1", tokens: int = len(PROMPT)) -> RingPlan:
    segments = [[Segment(start=s, end=e) for s, e in member] for member in zigzag_segments(tokens, 4, size)]
    return RingPlan(request_id=request_id, workers=[f"w{i}" for i in range(size)], world_ranks=list(range(size)),
                    world_generation=1, chunk_tokens=4, segments=segments, prompt_tokens=tokens,
                    fusion_partition="p0")


class FakePort:
    """Workers whose prefill runs until it is aborted (or `finish` is set), as a ring does."""

    def __init__(self):
        self.prefills: list[str] = []
        self.aborts: list[str] = []
        self.releases: list[str] = []
        self.decodes = 0
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.abort_marker = False  # answer `cancelled` even though nobody aborted

    async def prefill(self, worker_id, cmd: PrefillCommand) -> PrefillResult:
        self.prefills.append(worker_id)
        if len(self.prefills) == cmd.plan.size:
            self.started.set()
        aborted = asyncio.ensure_future(self._aborted(cmd.plan.size))
        finished = asyncio.ensure_future(self.finish.wait())
        await asyncio.wait([aborted, finished], return_when=asyncio.FIRST_COMPLETED)
        aborted.cancel()
        finished.cancel()
        if len(self.aborts) == cmd.plan.size or self.abort_marker:
            return PrefillResult(request_id=cmd.plan.request_id, member=cmd.member, ok=False, cancelled=True,
                                 error="prefill cancelled before layer 1 of 3", cached_tokens=2)
        return PrefillResult(request_id=cmd.plan.request_id, member=cmd.member, ok=True,
                             token_id=7 if cmd.member == cmd.plan.leader() else None)

    async def _aborted(self, size):
        while len(self.aborts) < size:
            await asyncio.sleep(0.001)

    instance = "scheduler-test"
    events_subject = "tokens.test"

    def watch(self, request_id):
        self.decodes += 1  # the runner waits for decode tokens
        return asyncio.Queue()

    def unwatch(self, request_id):
        pass

    async def release(self, worker_id, request_id):
        self.releases.append(worker_id)

    async def abort(self, worker_id, request_id):
        self.aborts.append(worker_id)


def runner_for(port, plan, stream_events=None):
    state = RequestState(request_id=plan.request_id, prompt_ids=PROMPT,
                         request=GenerateRequest(input_ids=PROMPT, max_new_tokens=5))

    async def emit(event):
        stream_events.append(event)

    return RequestRunner(state, port, StopChecker(None, []), {2}, emit if stream_events is not None else None)


@pytest.mark.parametrize("size", [1, 3])
async def test_a_cancel_during_prefill_aborts_every_member_and_ends_cancelled(size):
    port, plan, events = FakePort(), ring_plan(size), []
    runner = runner_for(port, plan, events)
    task = asyncio.create_task(runner.run(plan))
    await asyncio.wait_for(port.started.wait(), 5)
    assert runner.prefilling
    assert await runner.cancel() is True
    reply = await asyncio.wait_for(task, 5)
    # ended normally (cancelled): the leader ends it on the ring
    assert sorted(port.aborts) == sorted(plan.workers) and port.releases == [plan.workers[plan.leader()]]
    assert reply.finish_reason == "cancelled" and reply.output_ids == [] and reply.usage.completion_tokens == 0
    assert reply.usage.cached_tokens == 2 * size and events == []
    assert not runner.prefilling and await runner.cancel() is False  # after the prefill: nothing to abort


async def test_a_cancel_before_the_prefill_is_sent_sends_none():
    port, plan = FakePort(), ring_plan(2)
    runner = runner_for(port, plan)
    assert await runner.cancel() is False  # not placed yet: nothing to abort
    reply = await asyncio.wait_for(runner.run(plan), 5)
    assert reply.finish_reason == "cancelled" and reply.output_ids == []
    assert port.prefills == [] and port.aborts == [] and port.releases == [plan.workers[plan.leader()]]


async def test_a_cancel_after_the_prefill_stops_decode_as_before():
    port, plan = FakePort(), ring_plan(2)
    port.finish.set()
    runner = runner_for(port, plan)
    forwarded = []

    async def emit(event):  # the client cancels when it sees the first token
        forwarded.append(await runner.cancel())

    runner.emit = emit
    reply = await asyncio.wait_for(runner.run(plan), 5)
    assert reply.finish_reason == "cancelled" and reply.output_ids == [7]
    assert forwarded == [False] and port.aborts == []


async def test_a_cancelled_answer_nobody_asked_for_is_an_error():
    port, plan = FakePort(), ring_plan(2)
    port.abort_marker = True
    port.finish.set()
    runner = runner_for(port, plan)
    with pytest.raises(ApiError) as err:
        await asyncio.wait_for(runner.run(plan), 5)
    assert err.value.code == ErrorCode.INTERNAL and sorted(port.releases) == ["w0", "w1"]


def test_prefill_aborted_needs_the_client_cancel_and_a_cancelled_member():
    ok = PrefillResult(request_id="r", member=0, ok=True)
    cancelled = PrefillResult(request_id="r", member=1, ok=False, cancelled=True)
    assert prefill_aborted([cancelled, cancelled], True)
    assert prefill_aborted([ok, cancelled], True)
    assert not prefill_aborted([ok, ok], True)  # the abort came too late: decode sees the cancel
    assert not prefill_aborted([cancelled], False)


# ------------------------------------------------------------------------------------ engine
def prefill_cmd(plan: RingPlan, member: int) -> PrefillCommand:
    ids = [PROMPT[p] for s in plan.segments[member] for p in range(s.start, s.end)]
    return PrefillCommand(plan=plan, member=member, input_ids=ids, sampling=SamplingParams(logprobs=True))


def abort_before(layer: int, here: bool = True):
    """should_abort that says yes from the boundary before `layer` on (asked once per layer)."""
    asked = [0]

    def should_abort() -> bool:
        asked[0] += 1
        return here and asked[0] > layer

    return should_abort, asked


@pytest.mark.parametrize("layer", [0, 2])
def test_a_single_worker_prefill_stops_at_the_layer_boundary_and_keeps_nothing(layer):
    engine = make_engine(tiny_model("default"))
    plan = ring_plan(1)
    done = []
    should_abort, asked = abort_before(layer)
    with pytest.raises(PrefillAborted) as aborted:
        engine.prefill(prefill_cmd(plan, 0), progress=done.append, should_abort=should_abort)
    assert (aborted.value.layer, aborted.value.layers, aborted.value.requested_here) == (layer, LAYERS, True)
    assert done == list(range(1, layer + 1)) and asked[0] == layer + 1
    assert engine.requests == {} and engine.kv_tokens == 0
    # the engine serves the next request as a fresh one does
    again = engine.prefill(prefill_cmd(plan, 0), should_abort=lambda: False)
    fresh = make_engine(tiny_model("default")).prefill(prefill_cmd(plan, 0))
    assert again.ok and (again.token_id, again.logprob) == (fresh.token_id, fresh.logprob)


# A world of 3 ranks. First the ring [2, 0] (rank 1 is busy elsewhere and takes no part), then
# all three in another order: members that were in different earlier rings must still meet.
RINGS = [[2, 0], [1, 2, 0]]


def run_ring_rank(rank: int, world_size: int, store_path: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=DIST_TIMEOUT_S))
    try:
        engine = make_engine(tiny_model("default"), dist_timeout_s=DIST_TIMEOUT_S)
        for n, ring in enumerate(RINGS):
            if rank in ring:
                check_ring_abort(engine, ring, rank, f"r{n}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def check_ring_abort(engine: WorkerEngine, ring: list[int], rank: int, rid: str) -> None:
    member = ring.index(rank)
    plan = ring_plan(len(ring), request_id=rid).model_copy(update={"world_ranks": ring})
    # Only the last member is told, before layer 1 (its abort raced the others'): all stop there.
    told = member == len(ring) - 1
    should_abort, _ = abort_before(1, here=told)
    try:
        engine.prefill(prefill_cmd(plan, member), should_abort=should_abort)
    except PrefillAborted as exc:
        assert (exc.layer, exc.layers, exc.requested_here) == (1, LAYERS, told), (rank, exc)
    else:
        raise AssertionError(f"rank {rank}: the prefill was not aborted")
    assert rid not in engine.requests
    # The ring is usable at once: the same prompt again, nobody aborting, equals a ring of one.
    again = plan.model_copy(update={"request_id": f"{rid}-again"})
    result = engine.prefill(prefill_cmd(again, member), should_abort=lambda: False)
    assert result.ok and engine.requests[again.request_id].kv.tokens == len(prefill_cmd(plan, member).input_ids)
    if member == plan.leader():
        alone = make_engine(tiny_model("default"))
        reference = alone.prefill(prefill_cmd(ring_plan(1), 0))
        assert result.token_id == reference.token_id, (result, reference)
        assert result.logprob == pytest.approx(reference.logprob, abs=1e-5)
    engine.release(again.request_id)


def test_ring_members_agree_to_stop_at_the_same_layer_and_stay_usable(tmp_path):
    mp.spawn(run_ring_rank, args=(3, str(tmp_path / "store")), nprocs=3, join=True)
