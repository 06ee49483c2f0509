"""The worker's in-process LRU of recently stored or loaded blocks, in front of Redis.

Blocks are content-addressed (the key names the exact prefix), so an entry is never stale: it
may only outlive its copy in Redis, which is harmless.
"""

from __future__ import annotations

from collections import OrderedDict

from shared.kv.quant import QuantizedKV


class HotCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, QuantizedKV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> QuantizedKV | None:
        q = self._entries.get(key)
        if q is not None:
            self._entries.move_to_end(key)
        return q

    def put(self, key: str, q: QuantizedKV) -> None:
        if q.nbytes > self.max_bytes:
            return  # would evict everything else and still not fit
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[key] = q
        self.nbytes += q.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
