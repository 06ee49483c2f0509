"""OpenTelemetry instruments of the KV store: the worker-side block store and the kvstore service.

Names follow shared/metrics.py (Prometheus family names). Lookup hits and misses go into its
`ringserve_kv_cache_lookups` counter, which the dashboards' hit rate per `node` reads: the
kvstore's index lookups as node `index`, a worker's block reads per Redis node (`host:port`,
shared/kv/nodes.py `node_label`) and per worker hot cache (`hot:<worker id>`); what is stored now
is an observable gauge fed from the service's latest statistics, so it never drifts. Without a
meter (tests, tools) the global provider's is used, a no-op until telemetry is set up.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from shared.metrics import RingserveMetrics, kv_cache_lookups_counter, record_kv_lookup

_METER_NAME = "ringserve.kv"
# Bytes per second of one put_blocks/get_blocks call: from a slow CPU box to NVLink-class links.
THROUGHPUT_BUCKETS_BPS = (1e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11)
# The `node` label of lookups answered by the kvstore's index (rather than by one Redis shard).
INDEX_NODE = "index"


class StoreMetrics:
    """Block store (worker side): bytes moved, block outcomes and lookups per node, load/store throughput."""

    def __init__(self, meter: Meter | None = None):
        meter = meter or metrics.get_meter(_METER_NAME)
        self.lookups = kv_cache_lookups_counter(meter)
        self.bytes_written = meter.create_counter(
            "ringserve_kv_store_written_bytes", unit="By", description="KV block bytes written to Redis, by quant mode"
        )
        self.bytes_read = meter.create_counter(
            "ringserve_kv_store_read_bytes", unit="By", description="KV block bytes read from Redis, by quant mode"
        )
        self.blocks_read = meter.create_counter(
            "ringserve_kv_store_blocks_read",
            unit="{block}",
            description="blocks asked of the block store by result: hit (Redis), hot (in-process), miss, corrupt; "
                        "and node (Redis host:port, or hot:<worker id>)",
        )
        self.throughput = meter.create_histogram(
            "ringserve_kv_store_throughput_bytes_per_second",
            unit="By/s",
            description="bytes per second of one store (op=store) or load (op=load) call",
            explicit_bucket_boundaries_advisory=THROUGHPUT_BUCKETS_BPS,
        )

        self.prefix_decisions = meter.create_counter(
            "ringserve_kv_prefix_decisions",
            unit="{prefill}",
            description="a worker's choice for the cached tokens of a prefill (the cost model): load them from "
                        "Redis, compute them, or load to measure the store again (probe); by quant mode",
        )
        self.prefix_seconds_saved = meter.create_counter(
            "ringserve_kv_prefix_seconds_saved",
            unit="s",
            description="predicted seconds the cost model's choices saved over the other choice",
        )

    def prefix_decision(self, decision: str, quant: str, saved_s: float) -> None:
        self.prefix_decisions.add(1, {"decision": decision, "quant": quant})
        if saved_s > 0:
            self.prefix_seconds_saved.add(saved_s, {"decision": decision})

    def lookup(self, hits: int, misses: int, node: str) -> None:
        """Blocks found / not found on one node (a Redis node's label, or a hot cache's)."""
        record_kv_lookup(self.lookups, hits, misses, node)

    def blocks(self, result: str, count: int, node: str) -> None:
        self.blocks_read.add(count, {"result": result, "node": node})


class IndexMetrics:
    """kvstore service: lookups, evictions, and what is stored now per quant mode."""

    def __init__(self, meter: Meter | None = None):
        meter = meter or metrics.get_meter(_METER_NAME)
        self._shared = RingserveMetrics(meter)
        self.evictions = meter.create_counter(
            "ringserve_kv_evictions", unit="{block}", description="blocks dropped, by reason: budget, ttl, lost"
        )
        self._stored: dict[str, tuple[int, int]] = {}  # quant -> (bytes, blocks), from the latest stats
        self._hit_ratio: float | None = None
        meter.create_observable_gauge(
            "ringserve_kv_stored_bytes", callbacks=[self._observe_bytes], unit="By",
            description="bytes of KV blocks in the store, by quant mode",
        )
        meter.create_observable_gauge(
            "ringserve_kv_stored_blocks", callbacks=[self._observe_blocks], unit="{block}",
            description="KV blocks (all layers) in the store, by quant mode",
        )
        meter.create_observable_gauge(
            "ringserve_kv_hit_ratio", callbacks=[self._observe_hit_ratio], unit="1",
            description="lookup blocks found / blocks asked for, over all kvstore replicas since the store began",
        )

    def lookup(self, hits: int, misses: int) -> None:
        self._shared.record_kv_lookup(hits, misses, node=INDEX_NODE)

    def stored(self, bytes_by_quant: dict[str, int], blocks_by_quant: dict[str, int], hit_ratio: float | None) -> None:
        """The service's latest statistics (shared by all replicas through Redis)."""
        quants = set(bytes_by_quant) | set(blocks_by_quant) | set(self._stored)
        self._stored = {q: (bytes_by_quant.get(q, 0), blocks_by_quant.get(q, 0)) for q in quants}
        self._hit_ratio = hit_ratio

    def _observe_bytes(self, _options: CallbackOptions) -> Iterable[Observation]:
        for quant, (nbytes, _) in self._stored.items():
            yield Observation(nbytes, {"quant": quant})

    def _observe_blocks(self, _options: CallbackOptions) -> Iterable[Observation]:
        for quant, (_, blocks) in self._stored.items():
            yield Observation(blocks, {"quant": quant})

    def _observe_hit_ratio(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._hit_ratio is not None:
            yield Observation(self._hit_ratio)
