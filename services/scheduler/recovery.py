"""Recovery by recomputation: when a request's ring loses a worker, or the fusion partition that
merges its decode, the request runs again on the live workers with the prompt it had plus the
tokens it already produced, asking only for the tokens still due. The client has seen those tokens
already, so the resumed run streams only new ones, and the reply counts the whole request as one
undisturbed run would.

Why recompute (and not restore the lost member's KV from its shard copies in Redis): it needs
nothing but the prompt and the tokens so far, and the prefix cache already skips the prompt
blocks that were stored. Restoring shards is later work (issue 11 item 2, docs/RELIABILITY.md).
A lost fusion partition loses no KV at all: the ring's members are alive, but their run cannot
merge a decode step any more, and re-running it (on a live partition, or on one worker, which
needs none) is simpler than moving a run between partitions mid-step.

Identical continuations: greedy decoding recomputes the same tokens (the model is deterministic),
and so does seeded sampling: a worker seeds each token's draw from the request's seed and the
token's position (shared/sampling.py), so the resumed run's first token, at position prompt + n,
gets the draws of the undisturbed run's (n+1)-th.

Pure functions here; recovery_run.py re-places a request, the scheduler's main wires them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shared.messages import GenerateRequest

# A resumed run's id as the workers know it: the request's id and the attempt. A fresh id keeps
# a survivor's leftovers of the dead run (a prefill still stopping, late tokens) apart from it.
ATTEMPT_SEPARATOR = "~r"  # "~" is not in a client id (RequestId): a run id never equals one


class RecoveryOutcome(str, enum.Enum):
    """How a request whose ring lost a worker ended (the ringserve_request_recoveries label)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"  # no recovery left, no worker left, or the resumed run failed


class RecoveryCause(str, enum.Enum):
    """Why a request ran again (the ringserve_request_recoveries `cause` label, recovery.cause)."""

    WORKER = "worker"  # a member of its ring stopped sending heartbeats
    FUSION = "fusion"  # the fusion partition merging its ring's decode stopped sending heartbeats


@dataclass(frozen=True)
class Loss:
    """What a dead run lost: the workers of its ring, or its fusion partition (`lost`, one)."""

    cause: RecoveryCause
    lost: tuple[str, ...]

    def describe(self) -> str:
        """The client-facing start of a failure's message."""
        what = "workers" if self.cause == RecoveryCause.WORKER else "fusion partition"
        return f"{what} lost: {list(self.lost)}"


def attempt_id(request_id: str, attempt: int) -> str:
    """The id of a request's `attempt`-th run on workers (0: the first, under its own id)."""
    return request_id if attempt == 0 else f"{request_id}{ATTEMPT_SEPARATOR}{attempt}"


def resumed_prompt(prompt_ids: list[int], output_ids: list[int]) -> list[int]:
    """The prompt a resumed run prefills: the request's prompt and every token produced so far,
    at the positions they had, so the next token is the one an undisturbed run would give."""
    return [*prompt_ids, *output_ids]


def remaining_request(req: GenerateRequest, produced: int) -> GenerateRequest:
    """The request as the resumed run places and decodes it: only the tokens still due (at
    least one: a request with all its tokens has ended and needs no recovery)."""
    if produced >= req.max_new_tokens:
        raise ValueError(f"{produced} tokens of {req.max_new_tokens} produced: nothing left to recover")
    return req.model_copy(update={"max_new_tokens": req.max_new_tokens - produced})


def continuation(req: GenerateRequest) -> str:
    """How a resumed run's tokens relate to an undisturbed run's, for its span and log: "greedy"
    and "seeded" continue identically, "unseeded" draws afresh (as any run of it would)."""
    if req.temperature == 0.0:
        return "greedy"
    return "unseeded" if req.seed is None else "seeded"


def may_run_again(runs_done: int, max_runs: int, cancelled: bool, draining: bool) -> bool:
    """Whether a request runs again (after a lost worker or fusion, or a preemption): not when the
    client cancelled it, not while the scheduler drains (it must end, not start over), and at most
    `max_runs` times for that cause."""
    return not cancelled and not draining and runs_done < max_runs


may_recover = may_run_again  # bounded by max_recoveries
