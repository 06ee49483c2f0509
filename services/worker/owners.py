"""Which scheduler instance owns each request a worker leads, and whether it is still alive.

A scheduler that dies (SIGKILL, a lost host) leaves its requests on the workers: a leader would
decode on to max_new_tokens for nobody, and hold their KV meanwhile. Workers hear the
schedulers' heartbeats; a request whose owner has been silent for `timeout_s` (or never spoke
since the request came) is an orphan, ended like a release. A request that ended here on its
own (max tokens, a stop token) is watched a while longer: if its owner was already dead, nobody
sent the client its reply, and the leader tells the client instead. Pure bookkeeping, no NATS.
"""

from __future__ import annotations

import time


class OwnerWatch:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._last_seen: dict[str, float] = {}  # scheduler instance -> last heartbeat
        self._owner: dict[str, tuple[str, float]] = {}  # request -> (instance, when it came)
        self._ended: dict[str, float] = {}  # request -> when it ended here, its owner not yet heard since

    def on_heartbeat(self, instance: str, now: float | None = None) -> None:
        self._last_seen[instance] = time.monotonic() if now is None else now

    def own(self, request_id: str, instance: str, now: float | None = None) -> None:
        self._owner[request_id] = (instance, time.monotonic() if now is None else now)

    def forget(self, request_id: str) -> None:
        self._owner.pop(request_id, None)
        self._ended.pop(request_id, None)

    def ended(self, request_id: str, now: float | None = None) -> None:
        """The request ended here on its own: watched until its owner speaks again (settled) or
        stays silent (an orphan whose client heard nothing)."""
        if request_id in self._owner:
            self._ended[request_id] = time.monotonic() if now is None else now

    def settled(self) -> list[str]:
        """Ended requests whose owner has spoken since they ended: alive, so it replied."""
        return [rid for rid, at in self._ended.items()
                if self._last_seen.get(self._owner[rid][0], float("-inf")) > at]

    def was_ended(self, request_id: str) -> bool:
        return request_id in self._ended

    def orphans(self, now: float | None = None) -> list[str]:
        """Requests whose owner has not been heard from for timeout_s."""
        now = time.monotonic() if now is None else now
        return [rid for rid, (instance, since) in self._owner.items()
                if now - max(self._last_seen.get(instance, since), since) > self.timeout_s]
