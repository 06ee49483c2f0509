"""The Grafana dashboard queries only series that RingserveMetrics really exports, through the
datasource that provisioning creates, from the folder compose mounts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import RingserveMetrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
# Labels Prometheus adds at scrape time, and the bucket bound of histograms.
SCRAPE_LABELS = {"job", "instance", "le"}
# The metrics the brief asks every dashboard reader to find.
REQUIRED_SERIES = {
    "ringserve_kv_cache_lookups_total",
    "ringserve_ring_comm_latency_milliseconds_bucket",
    "ringserve_attention_sparsity_ratio_sum",
    "ringserve_device_memory_used_bytes",
    "ringserve_queue_depth",
    "ringserve_ttft_milliseconds_bucket",
    "ringserve_time_per_output_token_milliseconds_bucket",
    "ringserve_prefill_tokens_total",
    "ringserve_decode_tokens_total",
    "ringserve_requests_total",
}


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """(sample names, label names) of a Prometheus scrape after every instrument recorded once."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)])
    metrics = RingserveMetrics(provider.get_meter("dashboard-test"))
    metrics.record_kv_lookup(hits=1, misses=1, node="redis-0")
    metrics.record_ring_comm(1.0)
    metrics.record_attention_sparsity(1, 2)
    metrics.record_ttft(10.0)
    metrics.record_time_per_output_token(5.0)
    metrics.record_prefill(100, 1.0)
    metrics.record_decode(10, 1.0)
    metrics.record_request("ok")
    metrics.watch_queue("pending", lambda: 1)
    text = generate_latest(registry).decode()
    provider.shutdown()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {s.name for s in samples}, {label for s in samples for label in s.labels}


def dashboard_targets(path: Path) -> list[dict]:
    return [t for panel in json.loads(path.read_text())["panels"] for t in panel.get("targets", [])]


def test_there_is_a_dashboard():
    assert DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_exported_series_and_labels(path, exported):
    sample_names, label_names = exported
    queried = set()
    for target in dashboard_targets(path):
        expr = target["expr"]
        names = set(re.findall(r"\bringserve_[a-z_]+", expr))
        assert names, f"no ringserve metric in {expr}"
        assert names <= sample_names, f"{expr}: {names - sample_names} is not exported"
        queried |= names
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        matched = set(re.findall(r"(\w+)\s*!?=~?\s*\"", expr))
        assert grouped | matched <= label_names | SCRAPE_LABELS, expr
        for legend_label in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
            assert legend_label in grouped, f"legend {{{{{legend_label}}}}} is not a grouping label of {expr}"
    assert REQUIRED_SERIES <= queried


def test_dashboard_uses_the_provisioned_datasource():
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        uids = {p["datasource"]["uid"] for p in panels} | {t["datasource"]["uid"] for p in panels for t in p["targets"]}
        assert uids == {source["uid"]}, path.name


def test_dashboards_folder_is_where_provisioning_looks():
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ringserve.yml").read_text())["providers"]
    volumes = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]["volumes"]
    assert f"./infra/grafana/dashboards:{provider['options']['path']}:ro" in volumes
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
