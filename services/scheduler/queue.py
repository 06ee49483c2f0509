"""The order of the requests waiting for workers with room: shortest remaining prefill first,
with aging. Pure: no clock, no asyncio (callers pass `now`), so tests drive it directly.

Why shortest first: a request's time to first token is mostly its prefill, so placing the least
prefill first keeps short prompts from waiting behind a long one and gives the least mean wait.
Alone that could starve a long prompt while short ones keep arriving, so each second waited
counts as `admission_aging_tokens_per_s` tokens less prefill: a long prompt goes ahead of fresh
short ones once it has waited (its prefill - theirs) / rate seconds. Equal priorities go first
come, first served.

A request that waits again after it ran (preempted for KV room, or recovered after a lost worker)
ages from its first arrival, not from its return: it keeps the credit it had earned, so fresh
short prompts cannot starve it out of the room it lost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass
class Waiter:
    request_id: str
    prefill_tokens: int  # the prompt tokens its prefill computes: those no cached block covers
    enqueued_at: float  # monotonic seconds
    seq: int  # arrival order: the tie-break
    place_at_entry: int = 0  # 1-based place in the order when it joined
    overtaken_by: int = 0  # later arrivals placed while it waited
    ages_from: float | None = None  # when its aging started (monotonic); None: enqueued_at

    @property
    def aging_start(self) -> float:
        return self.enqueued_at if self.ages_from is None else self.ages_from


def priority(waiter: Waiter, now: float, aging_tokens_per_s: float) -> float:
    """Lower goes first: the prefill still to do, less the credit earned by waiting."""
    return waiter.prefill_tokens - aging_tokens_per_s * (now - waiter.aging_start)


def admission_order(waiters: list[Waiter], now: float, aging_tokens_per_s: float) -> list[Waiter]:
    return sorted(waiters, key=lambda w: (priority(w, now, aging_tokens_per_s), w.seq))


class WaitQueue:
    """The waiting requests by id, in admission_order on demand."""

    def __init__(self, aging_tokens_per_s: float):
        self.aging_tokens_per_s = aging_tokens_per_s
        self._waiters: dict[str, Waiter] = {}
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiters

    def add(self, request_id: str, prefill_tokens: int, now: float, ages_from: float | None = None) -> Waiter:
        """`ages_from`: a returning request's first arrival (monotonic), from which it ages."""
        waiter = Waiter(request_id, prefill_tokens, now, next(self._arrivals), ages_from=ages_from)
        self._waiters[request_id] = waiter
        waiter.place_at_entry = self.places(now)[request_id]
        return waiter

    def remove(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    def order(self, now: float) -> list[Waiter]:
        return admission_order(list(self._waiters.values()), now, self.aging_tokens_per_s)

    def places(self, now: float) -> dict[str, int]:
        """Each waiting request's 1-based place: 1 is placed first once there is room."""
        return {w.request_id: place for place, w in enumerate(self.order(now), start=1)}

    def admitted(self, waiter: Waiter) -> None:
        """`waiter` leaves with a plan; those that arrived before it were overtaken."""
        self.remove(waiter.request_id)
        for earlier in self._waiters.values():
            if earlier.seq < waiter.seq:
                earlier.overtaken_by += 1
