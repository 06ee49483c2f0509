"""Which scheduler instance owns each request a worker leads, and whether it is still alive.

A scheduler that dies (SIGKILL, a lost host) leaves its requests on the workers: a leader would
decode on to max_new_tokens for nobody, and hold their KV meanwhile. Workers hear the
schedulers' heartbeats; a request whose owner has been silent for `timeout_s` (or never spoke
since the request came) is an orphan, ended like a release. Pure bookkeeping, no NATS.
"""

from __future__ import annotations

import time


class OwnerWatch:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._last_seen: dict[str, float] = {}  # scheduler instance -> last heartbeat
        self._owner: dict[str, tuple[str, float]] = {}  # request -> (instance, when it came)

    def on_heartbeat(self, instance: str, now: float | None = None) -> None:
        self._last_seen[instance] = time.monotonic() if now is None else now

    def own(self, request_id: str, instance: str, now: float | None = None) -> None:
        self._owner[request_id] = (instance, time.monotonic() if now is None else now)

    def forget(self, request_id: str) -> None:
        self._owner.pop(request_id, None)

    def orphans(self, now: float | None = None) -> list[str]:
        """Requests whose owner has not been heard from for timeout_s."""
        now = time.monotonic() if now is None else now
        return [rid for rid, (instance, since) in self._owner.items()
                if now - max(self._last_seen.get(instance, since), since) > self.timeout_s]
