"""Prefill aborts a worker was told about (`worker.<id>.abort`), read by the compute thread.

The event loop records an abort when the scheduler forwards a client's cancel; the engine asks,
from the compute thread, at every layer boundary of that request's prefill. An abort may arrive
before its prefill (queued behind other compute, or loading cached blocks): it then stops the
prefill before its first layer. It is forgotten when the prefill ends or the request is released;
one that arrives after both (it lost a race with the end of the prefill) is dropped after
`ttl_s`, so a later request reusing the id is never aborted by it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class AbortFlags:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}  # request id -> when the abort arrived

    def request(self, request_id: str) -> None:
        now = self._clock()
        with self._lock:
            for rid in [r for r, t in self._since.items() if now - t > self.ttl_s]:
                del self._since[rid]
            self._since.setdefault(request_id, now)

    def is_set(self, request_id: str) -> bool:
        now = self._clock()
        with self._lock:
            since = self._since.get(request_id)
            return since is not None and now - since <= self.ttl_s

    def clear(self, request_id: str) -> None:
        with self._lock:
            self._since.pop(request_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._since)
