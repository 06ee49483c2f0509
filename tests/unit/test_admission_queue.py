"""The admission order of waiting requests: shortest remaining prefill first, aging, ties FIFO."""

from __future__ import annotations

from services.scheduler.queue import WaitQueue, Waiter, admission_order

RATE = 100.0  # tokens of priority credit per second waited


def ids(waiters: list[Waiter]) -> list[str]:
    return [w.request_id for w in waiters]


def test_a_short_prompt_goes_before_a_long_one_that_came_first():
    q = WaitQueue(RATE)
    q.add("long", 10_000, now=0.0)
    q.add("short", 50, now=0.1)
    assert ids(q.order(now=0.2)) == ["short", "long"]
    assert q.places(now=0.2) == {"short": 1, "long": 2}


def test_aging_lets_a_long_prompt_through_after_enough_wait():
    q = WaitQueue(RATE)
    q.add("long", 1_000, now=0.0)
    # A fresh 100-token prompt arrives every second: the long one has waited 9 s when the one
    # of t = 9 comes, and its credit of 900 tokens makes it 100 tokens of prefill, a tie.
    for t in range(1, 9):
        q.add(f"short{t}", 100, now=float(t))
        assert ids(q.order(now=float(t)))[0] == f"short{t}"
        q.admitted(q.order(now=float(t))[0])
    q.add("short9", 100, now=9.0)
    assert ids(q.order(now=9.0)) == ["long", "short9"]  # the tie goes to the earlier arrival
    q.add("short10", 100, now=10.0)
    assert ids(q.order(now=10.0)) == ["long", "short9", "short10"]


def test_equal_priorities_go_first_come_first_served():
    waiters = [Waiter(f"r{i}", 64, enqueued_at=5.0, seq=i) for i in (3, 1, 2, 0)]
    assert ids(admission_order(waiters, now=6.0, aging_tokens_per_s=RATE)) == ["r0", "r1", "r2", "r3"]
    q = WaitQueue(RATE)
    for i in range(4):
        q.add(f"r{i}", 64, now=float(i))  # equal prompts: the longest waiting has the most credit
    assert ids(q.order(now=4.0)) == ["r0", "r1", "r2", "r3"]


def test_a_waiter_knows_its_place_at_entry_and_who_overtook_it():
    q = WaitQueue(RATE)
    long = q.add("long", 5_000, now=0.0)
    short = q.add("short", 10, now=0.0)
    assert (long.place_at_entry, short.place_at_entry) == (1, 1)
    q.admitted(short)
    assert long.overtaken_by == 1 and "short" not in q and len(q) == 1
    first = q.add("later", 10, now=0.0)
    q.remove("long")
    q.admitted(first)
    assert long.overtaken_by == 1  # removed (cancelled) waiters are not counted on
