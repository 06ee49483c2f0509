"""Continuous batching on the worker: which requests decode here, and what each one feeds next.

Pure bookkeeping, no torch and no NATS (vLLM v1's scheduler in miniature): the worker's decode
loop asks `next_batch()` for the steps to run, runs them, and hands the results to
`on_results()`, which returns the tokens to publish and the requests that just ended.

Two kinds of request decode on a worker:
  * led here: held by this worker alone, or spread over a ring that this worker leads (it holds
    the last prompt position and samples). Their steps are built here; the other ring members
    get each step as a tick (`ticks`) before it runs, so the ring runs it in lockstep.
  * followed: a ring member's share of a request led elsewhere. Its steps are the leader's
    ticks, run in the order they came; a `finish` tick ends it after the steps before it.
A request joins after its prefill and leaves between steps: at max_new_tokens, at a stop token,
or when the scheduler releases it (stop strings, cancel).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared.attention.layout import append_member
from shared.messages import DecodePlan, DecodeResult, DecodeStep, ErrorCode, RingPlan, SamplingParams, TokenItem


def followers(plan: RingPlan) -> list[str]:
    """The ring's workers other than its leader: they run the leader's ticks."""
    leader = plan.leader()
    return [w for m, w in enumerate(plan.workers) if m != leader]


@dataclass
class LedRequest:
    plan: RingPlan
    sampling: SamplingParams
    decode: DecodePlan
    token: int  # the newest token: what the next step feeds back
    generated: int = 1  # tokens so far, the prefill's included
    held: list[int] = field(default_factory=list)  # rows each ring member holds

    @property
    def request_id(self) -> str:
        return self.plan.request_id

    @property
    def followers(self) -> list[str]:
        return followers(self.plan)


@dataclass
class Ended:
    request_id: str
    followers: list[str]  # ring members to tell (a `finish` tick), led requests only
    decode: DecodePlan | None = None  # a led request's plan (its owner, the client's reply subject)


class DecodeBatcher:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch  # steps run at once; more requests take turns
        self.led: dict[str, LedRequest] = {}
        self.followed: dict[str, deque[DecodeStep]] = {}
        self._turn = 0

    # ---- joining and leaving ---------------------------------------------------------------
    def lead(self, plan: RingPlan, sampling: SamplingParams, decode: DecodePlan, first_token: int,
             rows_held: list[int]) -> bool:
        """A prefill led here produced its first token: decode it from now on. False when that
        token already ends the request (nothing to decode)."""
        request = LedRequest(plan, sampling, decode, first_token, held=list(rows_held))
        if self._finish_of(request, first_token) is not None:
            return False
        self.led[plan.request_id] = request
        return True

    def follow(self, tick: DecodeStep) -> None:
        """A ring leader's tick for a request this worker holds a share of."""
        self.followed.setdefault(tick.request_id, deque()).append(tick)

    def drop(self, request_id: str) -> Ended | None:
        """The request ends here now (released, or failed). Its followers, if led here, are named."""
        led = self.led.pop(request_id, None)
        self.followed.pop(request_id, None)
        if led is not None:
            return Ended(request_id, led.followers, led.decode)
        return None

    @property
    def idle(self) -> bool:
        return not self.led and not any(self.followed.values())

    # ---- one step --------------------------------------------------------------------------
    def next_batch(self, runnable: set[str]) -> tuple[list[DecodeStep], list[tuple[list[str], DecodeStep]], list[str]]:
        """(steps to run now, ticks to send first as (workers, step), followed requests whose
        leader finished them). `runnable`: the requests whose prefill has ended here."""
        ended = []
        steps: list[DecodeStep] = []
        for rid, ticks in list(self.followed.items()):
            if ticks and ticks[0].finish:
                ended.append(rid)
                del self.followed[rid]
            elif ticks and rid in runnable:
                steps.append(ticks[0])
        ticks_out = []
        led = [r for r in self.led.values() if r.request_id in runnable]
        room = max(self.max_batch - len(steps), 1)
        if len(led) > room:  # more requests than one step holds: take turns
            start = self._turn % len(led)
            led = (led[start:] + led[:start])[:room]
            self._turn += room
        for r in led:
            member = append_member(r.held)
            step = DecodeStep(request_id=r.request_id, step=r.generated - 1, token_id=r.token,
                              position=r.plan.prompt_tokens + r.generated - 1, append_member=member,
                              sampling=r.sampling)
            steps.append(step)
            if r.plan.size > 1:
                ticks_out.append((r.followers, step))
        return steps, ticks_out, ended

    def on_results(self, steps: list[DecodeStep],
                   results: list[DecodeResult]) -> tuple[list[tuple[str, TokenItem]], list[Ended]]:
        """Record a step's outcome: (tokens of led requests, each with the subject it goes to;
        requests that ended)."""
        items: list[tuple[str, TokenItem]] = []
        ended: list[Ended] = []
        for step, result in zip(steps, results):
            rid = step.request_id
            followed = self.followed.get(rid)
            if followed and followed[0] is step:
                followed.popleft()
                if not result.ok:
                    ended.append(self.drop(rid) or Ended(rid, []))
                continue
            led = self.led.get(rid)
            if led is None:  # released while the step ran
                continue
            if not result.ok:
                items.append((led.decode.events, TokenItem(
                    request_id=rid, index=led.generated, error_code=result.error_code or ErrorCode.INTERNAL,
                    error=result.error)))
                ended.append(self.drop(rid))
                continue
            led.held[step.append_member] += 1
            led.generated += 1
            led.token = result.token_id
            finish = self._finish_of(led, result.token_id)
            items.append((led.decode.events, TokenItem(request_id=rid, index=led.generated - 1,
                                                       token_id=result.token_id, logprob=result.logprob,
                                                       finish=finish)))
            if finish is not None:
                ended.append(self.drop(rid))
        return items, ended

    @staticmethod
    def _finish_of(request: LedRequest, token: int) -> str | None:
        if token in request.decode.stop_token_ids:
            return "stop"
        if request.generated >= request.decode.max_new_tokens:
            return "length"
        return None
