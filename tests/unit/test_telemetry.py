"""setup_telemetry: the Prometheus scrape endpoint and OTLP export (HTTP and gRPC) against tiny
local receivers started here."""

from __future__ import annotations

import socket
import threading
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from shared.messages import ErrorCode
from shared.metrics import RingserveMetrics
from shared.telemetry import setup_telemetry
from tests.helpers.otlp import OtlpHttpReceiver

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {family.name: family for family in text_string_to_metric_families(body)}


def samples(family, suffix: str = "") -> dict[tuple, float]:
    """{sorted label items (without `le`): value} of the family's samples named name+suffix."""
    return {
        tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


# ---------------------------------------------------------------------------------- Prometheus
def test_metrics_recorded_through_ringserve_metrics_are_scraped():
    port = free_port()
    telemetry = setup_telemetry("scrapetest", metrics_port=port)
    try:
        assert telemetry.metrics_port == port
        metrics = RingserveMetrics(telemetry.meter)
        metrics.record_request("ok")
        metrics.record_request("ok")
        metrics.record_request(ErrorCode.TIMEOUT)
        metrics.record_ttft(250.0)
        metrics.record_kv_lookup(hits=9, misses=1, node="redis-0")
        metrics.record_prefill(tokens=1000, seconds=0.5)
        metrics.watch_queue("pending", lambda: 4)

        families = scrape(port)
    finally:
        telemetry.shutdown()

    service = ("service_name", "ringserve-scrapetest")
    requests = families["ringserve_requests"]
    assert requests.type == "counter"
    assert samples(requests, "_total") == {(("code", "ok"), service): 2.0, (("code", "timeout"), service): 1.0}

    ttft = families["ringserve_ttft_milliseconds"]
    assert ttft.type == "histogram"
    assert samples(ttft, "_count") == {(service,): 1.0}
    assert samples(ttft, "_sum") == {(service,): 250.0}
    buckets = {float(s.labels["le"]): s.value for s in ttft.samples if s.name.endswith("_bucket")}
    assert buckets[100.0] == 0.0 and buckets[250.0] == 1.0 and buckets[float("inf")] == 1.0

    lookups = samples(families["ringserve_kv_cache_lookups"], "_total")
    assert lookups[(("node", "redis-0"), ("result", "hit"), service)] == 9.0
    assert samples(families["ringserve_prefill_tokens_per_second"], "_sum") == {(service,): 2000.0}
    assert samples(families["ringserve_queue_depth"]) == {(("queue", "pending"), service): 4.0}
    memory = samples(families["ringserve_device_memory_used_bytes"])
    assert memory[(("device", "cpu"), service)] > 0


def test_shutdown_releases_the_metrics_port():
    port = free_port()
    setup_telemetry("porttest", metrics_port=port).shutdown()
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # would raise EADDRINUSE if the server were still listening


def test_taken_metrics_port_does_not_stop_the_service():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        telemetry = setup_telemetry("busyport", metrics_port=taken.getsockname()[1])
        try:
            assert telemetry.metrics_server is None
            RingserveMetrics(telemetry.meter).record_request("ok")  # still usable
        finally:
            telemetry.shutdown()


def test_no_endpoint_and_no_port_starts_no_exporter(monkeypatch):
    """Every exporter (batch spans, periodic metrics, scrape server) runs a thread: none may start."""
    def new_threads() -> set[threading.Thread]:
        return set(threading.enumerate()) - threads_before

    threads_before = set(threading.enumerate())
    telemetry = setup_telemetry("quiet")
    try:
        assert telemetry.metrics_server is None
        with telemetry.tracer.start_as_current_span("unseen") as span:
            RingserveMetrics(telemetry.meter).record_request("ok")
        # Nothing is recorded, but the trace id still reaches logs and message headers.
        assert not span.is_recording() and span.get_span_context().is_valid
        assert new_threads() == set()
    finally:
        telemetry.shutdown()
    # The same check sees the exporters when an endpoint is configured.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    telemetry = setup_telemetry("loud")
    try:
        assert len(new_threads()) >= 2  # batch span processor + periodic metric reader
    finally:
        telemetry.tracer_provider.shutdown()  # nothing was recorded: no export is attempted
        telemetry.meter_provider.shutdown(timeout_millis=1000)


def span_names(bodies: list[bytes]) -> dict[str, str]:
    """{span name: service.name of its resource} over all export requests."""
    names = {}
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    names[span.name] = attrs["service.name"]
    return names


def metric_names(bodies: list[bytes]) -> set[str]:
    names = set()
    for body in bodies:
        for resource_metrics in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for scope in resource_metrics.scope_metrics:
                names.update(m.name for m in scope.metrics)
    return names


def test_spans_and_metrics_reach_an_otlp_http_endpoint(monkeypatch):
    with OtlpHttpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        telemetry = setup_telemetry("otlptest")
        with telemetry.tracer.start_as_current_span("prefill-chunk"):
            RingserveMetrics(telemetry.meter).record_ttft(42.0)
        telemetry.shutdown()  # flushes the batch span processor and the periodic metric reader

    assert span_names(receiver.bodies["/v1/traces"]) == {"prefill-chunk": "ringserve-otlptest"}
    assert "ringserve_ttft_milliseconds" in metric_names(receiver.bodies["/v1/metrics"])


def test_metrics_exporter_none_keeps_traces_only(monkeypatch):
    with OtlpHttpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "custom-name")
        telemetry = setup_telemetry("ignored")
        with telemetry.tracer.start_as_current_span("decode-step"):
            RingserveMetrics(telemetry.meter).record_request("ok")
        telemetry.shutdown()

    assert span_names(receiver.bodies["/v1/traces"]) == {"decode-step": "custom-name"}
    assert receiver.bodies["/v1/metrics"] == []


# ---------------------------------------------------------------------------------- OTLP/gRPC
class TraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests: list[bytes] = []

    def Export(self, request, context):
        self.requests.append(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_grpc_endpoint(monkeypatch):
    collector = TraceCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")  # this collector only serves traces
        telemetry = setup_telemetry("grpctest")
        with telemetry.tracer.start_as_current_span("ring-step"):
            pass
        telemetry.shutdown()
    finally:
        server.stop(grace=None)

    assert span_names(collector.requests) == {"ring-step": "ringserve-grpctest"}
