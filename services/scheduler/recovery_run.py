"""Re-placing a request whose run died with its ring (a lost worker or fusion partition,
recovery.py): the new plan, on the live workers, prefills the prompt and the tokens so far and
decodes the rest. The scheduler's main calls it from its run loop; the world keeper marks the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from shared.messages import ErrorCode, KVQuant, RingPlan
from shared.settings import Settings
from services.scheduler.admission import Admission
from services.scheduler.api import ApiError
from services.scheduler.preemption import monotonic_of
from services.scheduler.recovery import attempt_id, continuation, may_recover, remaining_request, resumed_prompt
from services.scheduler.runner import RequestRunner
from services.scheduler.world_keeper import WorldKeeper

log = structlog.get_logger("scheduler")


class Recovery:
    def __init__(self, admission: Admission, world: WorldKeeper, settings: Settings, tracer,
                 draining: Callable[[], bool]):
        self.admission = admission
        self.world = world
        self.settings = settings
        self.tracer = tracer
        self.draining = draining

    async def rerun(self, runner: RequestRunner, quant: KVQuant, recoveries: int) -> RingPlan | None:
        """A new plan for a request whose run died of `runner.lost`, after `recoveries` earlier
        recoveries; None when the client cancelled it meanwhile. Raises `unavailable` when it may
        not run again (no recovery left, the scheduler draining) or no worker can take it. The
        wait for workers is admission's: bounded by the request's timeout and the wait queue.
        A lost fusion partition is simply not offered again: placement picks a live one, or one
        worker when none is left (a ring of one merges with nobody)."""
        s = runner.s
        loss, produced = runner.lost, len(runner.output_ids)
        if loss is not None:
            runner.recovery_cause = loss.cause  # counted however it ends (main.py)
        if s.plan is not None:
            self.admission.release(s.plan.request_id)  # the dead ring holds no room
        if s.cancelled:
            return None
        assert loss is not None, "rerun needs a run that died of a loss"
        if not may_recover(recoveries, self.settings.max_recoveries, s.cancelled, self.draining()):
            why = "scheduler shutting down" if self.draining() else f"{recoveries} recoveries made, the limit"
            raise ApiError(ErrorCode.UNAVAILABLE, f"{loss.describe()} ({why})", s.request_id)
        # The dead plan no longer counts as a ring (the world may re-form without its dead member).
        runner.lost, s.plan = None, None
        attempt = recoveries + 1
        prompt = resumed_prompt(s.prompt_ids, runner.output_ids)
        with self.tracer.start_as_current_span("scheduler.recover", attributes={
                "request_id": s.request_id, "recovery.attempt": attempt, "recovery.cause": loss.cause.value,
                "recovery.lost": list(loss.lost), "recovery.tokens_so_far": produced,
                "resume.sampling": continuation(s.request), "prompt_tokens": len(prompt)}) as span:
            log.warning("request_recovering", cause=loss.cause.value, lost=list(loss.lost), tokens_so_far=produced,
                        attempt=attempt, max_recoveries=self.settings.max_recoveries, prompt_tokens=len(prompt),
                        sampling=continuation(s.request))
            await self.world.reformed(lambda: s.cancelled)
            try:
                plan = await self.admission.wait_for_placement(
                    attempt_id(s.request_id, attempt), len(prompt), len(prompt) - runner.prefix_cached_tokens,
                    remaining_request(s.request, produced), quant, lambda: s.cancelled,
                    ages_from=monotonic_of(s.arrival))  # it keeps the age it had earned
            except ApiError as err:
                span.set_attribute("recovery.failed", err.message)
                raise ApiError(err.code, f"{loss.describe()}; recovery failed: {err.message}",
                               s.request_id) from None
            if plan is not None:
                span.set_attributes({"ring.size": plan.size, "fusion.partition": plan.fusion_partition})
                log.info("request_placed", workers=plan.workers, chunk_tokens=plan.chunk_tokens,
                         prompt_tokens=len(prompt), attempt=attempt, cause=loss.cause.value)
            return plan
