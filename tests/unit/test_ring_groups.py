"""RingGroups' agreement groups: a ring's members meet however their earlier rings differed and
when the same ring comes back (c10d's own new_group would name them by each process's group
count, so members of other earlier rings would wait under other names until the timeout)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

from services.worker.ring_groups import RingGroups
from shared.attention.ring import ring_any
from shared.messages import RingPlan, Segment

TIMEOUT_S = 20
# Rings over a world of 3, one after another; ranks outside a ring take no part in it.
RINGS = [[0, 1], [1, 2], [2, 0], [0, 1, 2], [1, 2]]


def plan_for(ring: list[int], n: int) -> RingPlan:
    return RingPlan(request_id=f"r{n}", workers=[f"w{r}" for r in ring], world_ranks=ring, world_generation=1,
                    chunk_tokens=1, segments=[[Segment(start=i, end=i + 1)] for i in range(len(ring))],
                    prompt_tokens=len(ring), fusion_partition="p")


def run_rank(rank: int, world_size: int, store_path: str) -> None:
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        groups = RingGroups(timedelta(seconds=TIMEOUT_S))
        for n, ring in enumerate(RINGS):
            if rank in ring:
                # only the ring's last member raises the flag; every member must see it
                assert ring_any(rank == ring[-1], groups.agreement(plan_for(ring, n))), (rank, ring)
                assert not ring_any(False, groups.agreement(plan_for(ring, n))), (rank, ring)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rings_of_other_members_agree_in_their_own_group(tmp_path):
    mp.spawn(run_rank, args=(3, str(tmp_path / "store")), nprocs=3, join=True)
