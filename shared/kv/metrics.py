"""OpenTelemetry instruments of the KV store: the worker-side block store and the kvstore service.

Without a meter (tests, tools) the global provider's is used, which is a no-op until
`shared.telemetry.setup_telemetry` installs one.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

_METER_NAME = "ringserve.kv"


class StoreMetrics:
    """Block store (worker side): bytes moved, block outcomes, load/store throughput."""

    def __init__(self, meter: Meter | None = None):
        meter = meter or metrics.get_meter(_METER_NAME)
        self.bytes_written = meter.create_counter("ringserve.kv.store.bytes_written", unit="By")
        self.bytes_read = meter.create_counter("ringserve.kv.store.bytes_read", unit="By")
        # result: hit (Redis), hot (in-process cache), miss, corrupt
        self.blocks_read = meter.create_counter("ringserve.kv.store.blocks_read")
        self.store_throughput = meter.create_histogram("ringserve.kv.store.store_throughput", unit="By/s")
        self.load_throughput = meter.create_histogram("ringserve.kv.store.load_throughput", unit="By/s")


class IndexMetrics:
    """kvstore service: lookup hits and misses (in blocks), hit rate, bytes stored per mode, evictions."""

    def __init__(self, meter: Meter | None = None):
        meter = meter or metrics.get_meter(_METER_NAME)
        self.hits = 0
        self.misses = 0
        self.lookup_blocks = meter.create_counter("ringserve.kv.lookup.blocks")  # result: hit | miss
        self.bytes_stored = meter.create_up_down_counter("ringserve.kv.bytes_stored", unit="By")  # quant
        self.evictions = meter.create_counter("ringserve.kv.evictions")  # reason: budget | ttl | lost
        meter.create_observable_gauge("ringserve.kv.hit_rate", callbacks=[self._observe_hit_rate])

    def lookup(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        self.lookup_blocks.add(hits, {"result": "hit"})
        self.lookup_blocks.add(misses, {"result": "miss"})

    def _observe_hit_rate(self, _options: CallbackOptions) -> Iterable[Observation]:
        total = self.hits + self.misses
        if total:
            yield Observation(self.hits / total)
