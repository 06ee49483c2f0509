"""The worker's continuous batching, as pure bookkeeping: who steps, with which token, and when a
request ends."""

from __future__ import annotations

from shared.messages import DecodePlan, DecodeResult, DecodeStep, RingPlan, SamplingParams, Segment
from services.worker.batcher import DecodeBatcher

EVENTS = "tokens.s1"


def plan(rid: str, workers: list[str], segments: list[list[tuple[int, int]]]) -> RingPlan:
    return RingPlan(request_id=rid, workers=workers, world_ranks=list(range(len(workers))), world_generation=1,
                    chunk_tokens=4, segments=[[Segment(start=s, end=e) for s, e in m] for m in segments],
                    prompt_tokens=max(e for m in segments for _, e in m), fusion_partition="p")


def decode(max_new: int, stop=(2,)) -> DecodePlan:
    return DecodePlan(max_new_tokens=max_new, stop_token_ids=list(stop), events=EVENTS)


def ok(step: DecodeStep, token: int | None) -> DecodeResult:
    return DecodeResult(request_id=step.request_id, member=0, step=step.step, ok=True, token_id=token, logprob=-1.0)


def test_a_request_steps_until_max_new_tokens_and_its_tokens_come_in_order():
    b = DecodeBatcher(max_batch=8)
    assert b.lead(plan("r", ["w"], [[(0, 5)]]), SamplingParams(), decode(3), first_token=9, rows_held=[5])
    steps, ticks, ended = b.next_batch({"r"})
    assert ticks == [] and ended == []
    assert [(s.step, s.token_id, s.position, s.append_member) for s in steps] == [(0, 9, 5, 0)]
    items, done = b.on_results(steps, [ok(steps[0], 11)])
    assert [(subject, i.index, i.token_id, i.finish) for subject, i in items] == [(EVENTS, 1, 11, None)]
    assert done == []
    steps, _, _ = b.next_batch({"r"})
    assert [(s.step, s.token_id, s.position) for s in steps] == [(1, 11, 6)]
    items, done = b.on_results(steps, [ok(steps[0], 12)])
    assert [(i.index, i.finish) for _, i in items] == [(2, "length")] and [e.request_id for e in done] == ["r"]
    assert b.idle and b.next_batch({"r"})[0] == []


def test_a_stop_token_ends_the_request_and_a_first_stop_token_never_joins():
    b = DecodeBatcher(max_batch=8)
    assert not b.lead(plan("x", ["w"], [[(0, 5)]]), SamplingParams(), decode(10), first_token=2, rows_held=[5])
    assert not b.lead(plan("y", ["w"], [[(0, 5)]]), SamplingParams(), decode(1), first_token=7, rows_held=[5])
    assert b.idle
    b.lead(plan("r", ["w"], [[(0, 5)]]), SamplingParams(), decode(10), first_token=7, rows_held=[5])
    steps, _, _ = b.next_batch({"r"})
    items, done = b.on_results(steps, [ok(steps[0], 2)])
    assert items[0][1].finish == "stop" and done[0].request_id == "r" and b.idle


def test_requests_join_between_steps_and_a_released_one_leaves():
    b = DecodeBatcher(max_batch=8)
    b.lead(plan("a", ["w"], [[(0, 3)]]), SamplingParams(), decode(50), 5, [3])
    steps, _, _ = b.next_batch({"a"})
    b.lead(plan("b", ["w"], [[(0, 4)]]), SamplingParams(), decode(50), 6, [4])  # joins while a steps
    b.on_results(steps, [ok(steps[0], 7)])
    steps, _, _ = b.next_batch({"a", "b"})
    assert [s.request_id for s in steps] == ["a", "b"]
    assert b.drop("a") is not None  # released (stop string) while the step ran
    items, done = b.on_results(steps, [ok(steps[0], 8), ok(steps[1], 9)])
    assert [i.request_id for _, i in items] == ["b"] and done == []
    assert [s.request_id for s in b.next_batch({"b"})[0]] == ["b"]


def test_a_request_whose_prefill_has_not_ended_here_waits():
    b = DecodeBatcher(max_batch=8)
    b.lead(plan("a", ["w"], [[(0, 3)]]), SamplingParams(), decode(50), 5, [3])
    assert b.next_batch(set())[0] == []
    b.follow(DecodeStep(request_id="f", step=0, token_id=1, position=9, append_member=1, sampling=SamplingParams()))
    assert [s.request_id for s in b.next_batch({"f"})[0]] == ["f"]


def test_more_requests_than_a_step_holds_take_turns():
    b = DecodeBatcher(max_batch=2)
    for rid in "abc":
        b.lead(plan(rid, ["w"], [[(0, 3)]]), SamplingParams(), decode(50), 5, [3])
    seen = []
    for _ in range(3):
        steps, _, _ = b.next_batch(set("abc"))
        assert len(steps) == 2
        seen += [s.request_id for s in steps]
        b.on_results(steps, [ok(s, 7) for s in steps])
    assert sorted(seen) == sorted("abc" * 2)  # each got two of the six turns


def test_a_ring_leader_ticks_its_members_and_spreads_the_new_rows():
    b = DecodeBatcher(max_batch=8)
    p = plan("r", ["w0", "w1"], [[(0, 2), (6, 8)], [(2, 6)]])  # w1 holds 4 rows, w0 4 rows; leader w0
    assert p.leader() == 0
    b.lead(p, SamplingParams(), decode(5), 9, rows_held=[4, 4])
    appended = []
    for _ in range(3):
        steps, ticks, _ = b.next_batch({"r"})
        assert ticks == [(["w1"], steps[0])]
        appended.append(steps[0].append_member)
        b.on_results(steps, [ok(steps[0], 7)])
    assert appended == [0, 1, 0]  # the member holding the fewest rows takes the next one
    end = b.drop("r")
    assert end.followers == ["w1"]


def test_a_follower_runs_the_ticks_in_order_and_ends_at_the_finish_tick():
    b = DecodeBatcher(max_batch=8)
    tick = DecodeStep(request_id="r", step=3, token_id=4, position=20, append_member=1, sampling=SamplingParams())
    b.follow(tick)
    b.follow(DecodeStep(request_id="r", step=-1, token_id=0, position=0, append_member=0,
                        sampling=SamplingParams(), finish=True))
    steps, _, ended = b.next_batch({"r"})
    assert steps == [tick] and ended == []  # the step the leader already runs comes first
    items, done = b.on_results(steps, [ok(tick, None)])
    assert items == [] and done == []
    steps, _, ended = b.next_batch({"r"})
    assert steps == [] and ended == ["r"] and b.idle


def test_a_failed_step_ends_the_request_with_an_error_token():
    b = DecodeBatcher(max_batch=8)
    b.lead(plan("r", ["w"], [[(0, 3)]]), SamplingParams(), decode(50), 5, [3])
    steps, _, _ = b.next_batch({"r"})
    failed = DecodeResult(request_id="r", member=-1, step=0, ok=False, error="boom")
    items, done = b.on_results(steps, [failed])
    assert items[0][1].error == "boom" and items[0][1].error_code is not None and done[0].request_id == "r"
