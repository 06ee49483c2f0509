"""RingserveMetrics records what its methods promise, read back through an in-memory reader."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from shared.messages import ErrorCode
from shared.metrics import (
    COMM_LATENCY_BUCKETS_MS,
    RATIO_BUCKETS,
    RingserveMetrics,
    device_memory_bytes,
    process_rss_bytes,
)

MIB = 1024 * 1024


@pytest.fixture
def meter_points():
    """A meter and a reader of the points recorded through it."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def points(name: str) -> list:
        """Data points of metric `name` at this moment (each call collects anew)."""
        data = reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else []:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return list(metric.data.data_points)
        return []

    yield provider.get_meter("test"), points
    provider.shutdown()


@pytest.fixture
def recorded(meter_points):
    meter, points = meter_points
    return RingserveMetrics(meter), points


def by_attrs(points: list, key: str) -> dict:
    return {p.attributes[key]: p for p in points}


def test_kv_lookups_count_hits_and_misses_per_node(recorded):
    metrics, points = recorded
    metrics.record_kv_lookup(hits=3, misses=1, node="redis-a")
    metrics.record_kv_lookup(hits=0, misses=2, node="redis-b")
    metrics.record_kv_lookup(hits=5, misses=0, node="redis-a")
    counts = {(p.attributes["node"], p.attributes["result"]): p.value for p in points("ringserve_kv_cache_lookups")}
    assert counts == {("redis-a", "hit"): 8, ("redis-a", "miss"): 1, ("redis-b", "miss"): 2}


def test_ring_comm_latency_histogram_uses_millisecond_buckets(recorded):
    metrics, points = recorded
    for ms in (0.3, 4.0, 4.5, 700.0):
        metrics.record_ring_comm(ms)
    metrics.record_ring_comm(2.0, op="fusion")
    ring = by_attrs(points("ringserve_ring_comm_latency_milliseconds"), "op")
    assert ring["ring_step"].count == 4 and ring["ring_step"].sum == pytest.approx(708.8)
    assert tuple(ring["ring_step"].explicit_bounds) == tuple(float(b) for b in COMM_LATENCY_BUCKETS_MS)
    assert ring["fusion"].count == 1


def test_attention_sparsity_is_the_skipped_fraction(recorded):
    metrics, points = recorded
    metrics.record_attention_sparsity(skipped_blocks=3, total_blocks=4)
    metrics.record_attention_sparsity(skipped_blocks=0, total_blocks=0)  # nothing to attend: no sample
    (point,) = points("ringserve_attention_sparsity_ratio")
    assert point.count == 1 and point.sum == pytest.approx(0.75)
    assert tuple(point.explicit_bounds) == RATIO_BUCKETS
    # 0.75 falls in the (0.7, 0.8] bucket.
    assert point.bucket_counts[RATIO_BUCKETS.index(0.8)] == 1


def test_request_attention_sparsity_is_recorded_as_a_fraction(recorded):
    metrics, points = recorded
    metrics.record_request_attention_sparsity(0.85)
    metrics.record_request_attention_sparsity(0.0)  # full attention: a sample of 0
    (point,) = points("ringserve_attention_sparsity")
    assert point.count == 2 and point.sum == pytest.approx(0.85)
    assert tuple(point.explicit_bounds) == RATIO_BUCKETS


def test_latency_histograms(recorded):
    metrics, points = recorded
    metrics.record_ttft(120.0)
    metrics.record_ttft(80.0)
    for ms in (20.0, 30.0, 40.0):
        metrics.record_time_per_output_token(ms)
    (ttft,) = points("ringserve_ttft_milliseconds")
    (tpot,) = points("ringserve_time_per_output_token_milliseconds")
    assert (ttft.count, ttft.sum) == (2, 200.0)
    assert (tpot.count, tpot.sum) == (3, 90.0)


def test_throughput_is_tokens_over_seconds(recorded):
    metrics, points = recorded
    metrics.record_prefill(tokens=4096, seconds=2.0)
    metrics.record_decode(tokens=50, seconds=2.5)
    metrics.record_decode(tokens=1, seconds=0.0)  # no elapsed time: counted, no rate sample
    (prefill_rate,) = points("ringserve_prefill_tokens_per_second")
    (decode_rate,) = points("ringserve_decode_tokens_per_second")
    assert (prefill_rate.count, prefill_rate.sum) == (1, 2048.0)
    assert (decode_rate.count, decode_rate.sum) == (1, 20.0)
    assert points("ringserve_prefill_tokens")[0].value == 4096
    assert points("ringserve_prefill_seconds")[0].value == 2.0
    assert points("ringserve_decode_tokens")[0].value == 51
    assert points("ringserve_decode_seconds")[0].value == 2.5


def test_request_outcomes_by_code(recorded):
    metrics, points = recorded
    metrics.record_request()
    metrics.record_request("ok")
    metrics.record_request(ErrorCode.OVERLOADED)
    counts = {p.attributes["code"]: p.value for p in points("ringserve_requests")}
    assert counts == {"ok": 2, "overloaded": 1}


def test_queue_depth_is_read_at_each_collection(recorded):
    metrics, points = recorded
    pending: list[int] = [1, 2, 3]
    metrics.watch_queue("pending", lambda: len(pending))
    metrics.watch_queue("decode", lambda: 7)
    depths = {p.attributes["queue"]: p.value for p in points("ringserve_queue_depth")}
    assert depths == {"pending": 3, "decode": 7}
    pending.clear()
    metrics.unwatch_queue("decode")
    depths = {p.attributes["queue"]: p.value for p in points("ringserve_queue_depth")}
    assert depths == {"pending": 0}


def test_device_memory_reports_cpu_rss_without_cuda(recorded):
    metrics, points = recorded
    (point,) = points("ringserve_device_memory_used_bytes")
    assert point.attributes == {"device": "cpu"}
    assert point.value > 10 * MIB  # a Python process with OpenTelemetry loaded
    assert set(device_memory_bytes()) == {"cpu"}


def test_process_rss_follows_allocations():
    before = process_rss_bytes()
    block = bytearray(64 * MIB)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
    grown = process_rss_bytes() - before
    del block
    assert grown > 48 * MIB


def test_block_store_lookups_share_the_series_per_node(meter_points):
    """The worker's block reads land in ringserve_kv_cache_lookups next to the kvstore's `index`
    lookups, one `node` per Redis node and per hot cache; block outcomes carry the node too."""
    from shared.kv.metrics import StoreMetrics

    meter, points = meter_points
    metrics, store = RingserveMetrics(meter), StoreMetrics(meter)  # as in a worker: both on one meter
    metrics.record_kv_lookup(hits=2, misses=1, node="index")
    store.lookup(hits=3, misses=0, node="10.0.0.1:6379")
    store.lookup(hits=0, misses=4, node="10.0.0.2:6380/1")
    store.lookup(hits=5, misses=7, node="hot:w-1")
    store.blocks("hit", 3, "10.0.0.1:6379")
    store.blocks("hot", 5, "hot:w-1")
    counts = {(p.attributes["node"], p.attributes["result"]): p.value for p in points("ringserve_kv_cache_lookups")}
    assert counts == {("index", "hit"): 2, ("index", "miss"): 1, ("10.0.0.1:6379", "hit"): 3,
                      ("10.0.0.2:6380/1", "miss"): 4, ("hot:w-1", "hit"): 5, ("hot:w-1", "miss"): 7}
    blocks = {(p.attributes["node"], p.attributes["result"]): p.value for p in points("ringserve_kv_store_blocks_read")}
    assert blocks == {("10.0.0.1:6379", "hit"): 3, ("hot:w-1", "hot"): 5}


@pytest.mark.parametrize("url, label", [
    ("redis://127.0.0.1:6379/0", "127.0.0.1:6379"),
    ("redis://redis-a", "redis-a:6379"),
    ("redis://:s3cret@redis-b:7000/0", "redis-b:7000"),
    ("rediss://user:s3cret@redis-c:6380/2", "redis-c:6380/2"),
    ("redis://[::1]:6379", "[::1]:6379"),
    ("unix:///run/redis.sock?db=3", "/run/redis.sock/3"),
])
def test_redis_node_label_is_host_port_without_credentials(url, label):
    from shared.kv.nodes import RedisNodes, node_label

    assert node_label(url) == label
    nodes = RedisNodes([url], timeout_s=1.0, retry_s=1.0, max_connections=1)
    assert nodes.labels == [label] and "s3cret" not in nodes.labels[0]
