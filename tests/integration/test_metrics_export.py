"""Every seed metric is exported on the services' Prometheus endpoints, parses with
prometheus_client's parser, and is non-zero after real requests."""

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    """{sample name with labels: value} of one endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "service_name")
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def label_values(samples: dict[str, float], name: str, label: str) -> set[str]:
    values = set()
    for key in samples:
        if key.split("{")[0] == name:
            labels = dict(pair.split("=", 1) for pair in key.split("{", 1)[1].rstrip("}").split(",") if pair)
            values.add(labels.get(label))
    return values


def total(samples: dict[str, float], name: str, **labels) -> float:
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for key, v in samples.items() if key.split("{")[0] == name and all(w in key for w in want))


async def test_seed_metrics_are_exported_and_non_zero(tmp_path):
    stack = Stack(tmp_path, workers=2, services=("fusion", "scheduler", "kvstore"), metrics=True,
                  env={"RINGSERVE_KV_COST_MODEL": "false",  # a hit loads (the cost model would compute)
                       "RINGSERVE_CHUNK_TOKENS": "16", "RINGSERVE_KV_BLOCK_TOKENS": "16",  # blocks = chunks
                       "OTEL_METRIC_EXPORT_INTERVAL": "200",
                       # the hot cache is on (it counts lookups) but holds nothing: blocks come from Redis
                       "RINGSERVE_KV_HOT_CACHE_BYTES": "1"})
    try:
        await stack.wait_ready(2)
        prompt = "metrics over a ring of two workers, twice"
        for _ in range(2):  # the second finds the first's blocks: a KV hit
            reply = await stack.generate({"prompt": prompt, "max_new_tokens": 6})
            assert "error" not in reply, f"{reply}\n{stack.logs()}"
            if reply["usage"]["cached_tokens"] == 0:
                await asyncio.sleep(1.0)  # blocks are stored after the reply
        reply = await stack.generate({"prompt": prompt, "max_new_tokens": 6})
        assert reply["usage"]["cached_tokens"] > 0, reply
        ports = stack.metrics_ports
        scheduler = scrape(ports["scheduler"])
        workers = [scrape(ports[label]) for label in ports if label.startswith("worker")]
        kvstore = scrape(ports["kvstore"])
        worker_ids = {w["worker_id"] for w in (await stack.wait_ready(2))["workers"]}
        redis_node = f"127.0.0.1:{stack.servers.redis_port}"
    finally:
        stack.stop()

    assert total(scheduler, "ringserve_requests_total", code="ok") == 3
    assert total(scheduler, "ringserve_ttft_milliseconds_count") == 3
    assert total(scheduler, "ringserve_time_per_output_token_milliseconds_count") >= 1
    assert any(k.startswith("ringserve_queue_depth{") for k in scheduler)  # a gauge: 0 when nothing waits
    for w in workers:
        assert total(w, "ringserve_prefill_tokens_total") > 0
        assert total(w, "ringserve_decode_tokens_total") > 0
        assert total(w, "ringserve_ring_comm_latency_milliseconds_count", op="fusion") > 0
        assert total(w, "ringserve_ring_comm_latency_milliseconds_count", op="ring_step") > 0
        assert total(w, "ringserve_attention_sparsity_ratio_count") > 0
        assert total(w, "ringserve_device_memory_used_bytes") > 0
    # the member holding the early chunk skips the later one: causal blocks never computed
    assert sum(total(w, "ringserve_attention_sparsity_ratio_sum") for w in workers) > 0
    assert total(kvstore, "ringserve_kv_cache_lookups_total", result="hit") > 0
    assert label_values(kvstore, "ringserve_kv_cache_lookups_total", "node") == {"index"}
    # per node: each worker's block reads on the Redis node (host:port) and on its own hot cache
    lookups = "ringserve_kv_cache_lookups_total"
    assert sum(total(w, lookups, node=redis_node, result="hit") for w in workers) > 0
    hot_nodes = {f"hot:{worker_id}" for worker_id in worker_ids}
    for w in workers:
        nodes = label_values(w, lookups, "node")
        assert nodes <= {redis_node} | hot_nodes and len(nodes & hot_nodes) <= 1, (nodes, hot_nodes)
    # every block a worker read missed its (too small) hot cache first
    assert sum(total(w, lookups, node="hot:", result="miss") for w in workers) > 0
    assert sum(total(w, lookups, node="hot:", result="hit") for w in workers) == 0
