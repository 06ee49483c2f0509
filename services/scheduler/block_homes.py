"""Where each prompt block was last held whole by one worker: cache-aware placement.

A one-worker request's prompt blocks stay in that worker's KV pool after it ends (the device
tier, services/worker/resident_prefix.py), so a later prompt with the same prefix prefill fastest
there. The scheduler remembers, per chain hash, the worker that last ran such a request (as
Dynamo's KV router does from its workers' events), bounded and least recently recorded first
out, and placement prefers that worker when it has room. A hint only: a worker that has since
let the blocks go just loads them from Redis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockHomes:
    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._home: OrderedDict[str, str] = OrderedDict()  # chain hash -> worker id

    def __len__(self) -> int:
        return len(self._home)

    def record(self, worker_id: str, chain_hashes: Sequence[str]) -> None:
        for h in chain_hashes:
            self._home[h] = worker_id
            self._home.move_to_end(h)
        while len(self._home) > self.max_blocks:
            self._home.popitem(last=False)

    def home_of(self, chain_hashes: Sequence[str]) -> str | None:
        """The worker holding the longest run of these leading blocks, as far as is known."""
        for h in reversed(chain_hashes):
            if h in self._home:
                return self._home[h]
        return None
