"""A ring's ranks and the process group its members agree on (the prefill abort agreement)."""

from __future__ import annotations

import datetime

import torch.distributed as dist

from shared.messages import RingPlan


class RingGroups:
    """The process group a ring agrees on.

    Point-to-point transfers (ring attention, collective decode fusion) run on the world group:
    on NCCL its communicator is made eagerly when the world forms (world.py), with every member
    taking part, so any subset of ranks may then exchange blocks while the others are busy
    elsewhere. No per-ring NCCL group is made: c10d names a new group by its ranks *and the
    number of groups the process already has*, so members whose earlier rings differed would
    wait under different names until the timeout.

    Collectives over the ring alone (the prefill abort agreement) run on a gloo group of
    exactly the ring's ranks, made directly over the world's store outside c10d's registry,
    on CPU flags, whatever the world's backend; cached for the world's generation (the store
    is the generation's, so its keys are never reused). It gets `timeout` (the world's
    distributed timeout): a dead peer ends the wait as it ends a transfer."""

    def __init__(self, timeout: datetime.timedelta | None = None) -> None:
        self.timeout = timeout
        self._generation = -1
        self._agreement: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def agreement(self, plan: RingPlan) -> dist.ProcessGroup:
        """The gloo group the ring's members run collectives on (a ring of more than one member)."""
        if plan.size == 1:
            raise ValueError("a ring of one agrees with itself")
        if plan.world_generation != self._generation:
            self._generation, self._agreement = plan.world_generation, {}
        ranks = tuple(plan.world_ranks)
        if ranks not in self._agreement:
            store = dist.PrefixStore(f"ringserve/agree/{'-'.join(map(str, ranks))}",
                                     dist.distributed_c10d._get_default_store())
            timeout = self.timeout or datetime.timedelta(minutes=30)  # torch's gloo default
            self._agreement[ranks] = dist.ProcessGroupGloo(store, ranks.index(dist.get_rank()), len(ranks), timeout)
        return self._agreement[ranks]


def ring_ranks(plan: RingPlan) -> list[int]:
    """World ranks of the ring; a ring of one needs no world (this process alone)."""
    if plan.size == 1:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return list(plan.world_ranks)
