"""The workers' torch.distributed world: one process group over all live workers, re-formed by
the scheduler (a new generation) whenever a worker joins or leaves.

Every worker hosts a rendezvous store from start-up and advertises its address in heartbeats;
the scheduler names the members in rank order and the store of member 0 is used, under a prefix
per generation, so no address or port is configured by hand.
"""

from __future__ import annotations

import datetime
import threading

import structlog
import torch
import torch.distributed as dist

from shared.messages import WorldForm

log = structlog.get_logger("world")


class World:
    def __init__(self, worker_id: str, advertise_host: str, timeout_s: float):
        self.worker_id = worker_id
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # Listen on every interface; peers reach us at advertise_host.
        self._store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.store_addr = f"{advertise_host}:{self._store.port}"
        self.generation = 0
        self.rank: int | None = None
        self.members: list[str] = []
        self._lock = threading.Lock()

    def form(self, msg: WorldForm) -> None:
        """Leave the current world and join generation `msg.generation` (blocking: run it in the
        compute thread, where it cannot race a ring operation)."""
        with self._lock:
            self._leave()
            self.generation = msg.generation
            self.members = list(msg.members)
            if self.worker_id not in msg.members:
                self.rank = None
                return
            rank = msg.members.index(self.worker_id)
            if rank == 0:
                store = self._store
            else:
                host, port = msg.store_addr.rsplit(":", 1)
                store = dist.TCPStore(host, int(port), is_master=False, timeout=self.timeout)
            prefixed = dist.PrefixStore(f"ringserve/gen{msg.generation}", store)
            # c10d names the default group by a process-wide counter that only a *successful*
            # destroy resets; after a failed join the counters of the members would differ and
            # they could never meet again. Every generation starts from the same name.
            dist.distributed_c10d._world.group_count = 0
            # On NCCL the world's communicator is made now, by every member at once (device_id:
            # eager init), so rings of any subset of ranks can later use it point-to-point.
            device_id = torch.device("cuda", torch.cuda.current_device()) if msg.backend == "nccl" else None
            dist.init_process_group(
                msg.backend, store=prefixed, rank=rank, world_size=len(msg.members), timeout=self.timeout,
                device_id=device_id,
            )
            self.rank = rank
            log.info("world_joined", generation=msg.generation, rank=rank, size=len(msg.members))

    def _leave(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # a dead peer may leave the group half-broken
                log.warning("world_leave_failed", error=str(exc))
        self.rank = None

    def close(self) -> None:
        with self._lock:
            self._leave()
