"""OpenTelemetry set-up from the standard OTEL_* variables, plus an optional Prometheus scrape endpoint.

- OTEL_EXPORTER_OTLP_ENDPOINT set: spans and metrics are pushed over OTLP
  (OTEL_EXPORTER_OTLP_PROTOCOL: `http/protobuf`, the default, or `grpc`). OTEL_TRACES_EXPORTER /
  OTEL_METRICS_EXPORTER = `none` turn one signal off (compose pulls metrics with Prometheus instead).
- `metrics_port` > 0: metrics are served for Prometheus at http://0.0.0.0:PORT/metrics.
- Neither: the SDK providers are installed without exporters; spans and metrics go nowhere and
  cost (almost) nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import structlog
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = structlog.get_logger("telemetry")

# The resource attribute copied onto every Prometheus series, so one dashboard can split by service.
_PROMETHEUS_RESOURCE_LABELS = frozenset({"service.name"})
_METRICS_BIND_ADDRESS = "0.0.0.0"


@dataclass
class Telemetry:
    tracer: trace.Tracer
    meter: metrics.Meter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    # The Prometheus scrape server, when one was asked for and could bind its port.
    metrics_server: WSGIServer | None = field(default=None)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.server_port if self.metrics_server else None

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None


def _signal_enabled(variable: str) -> bool:
    """OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER: a comma list, `otlp` by default, `none` for off."""
    exporters = {e.strip() for e in os.environ.get(variable, "otlp").split(",")}
    return "otlp" in exporters


def _otlp_exporters():
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter, OTLPMetricExporter


def _prometheus_endpoint(port: int) -> tuple[MetricReader, WSGIServer] | None:
    """A reader with its own registry (several services may share a process in tests) and the
    HTTP server exposing it; None when the port is taken (a metrics port must not kill a service)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    try:
        server, _thread = start_http_server(port, addr=_METRICS_BIND_ADDRESS, registry=registry)
    except OSError as exc:
        log.warning("metrics_port_unavailable", port=port, error=str(exc))
        return None
    reader = PrometheusMetricReader(
        registry=registry,
        scope_info_enabled=False,
        resource_attribute_filter=lambda key: key in _PROMETHEUS_RESOURCE_LABELS,
    )
    return reader, server


def setup_telemetry(service: str, metrics_port: int = 0) -> Telemetry:
    """Install tracer and meter providers for `service` (OTEL_SERVICE_NAME wins when set).

    The returned tracer and meter come from these providers, not the process-global ones: the
    global providers can be set only once, and tests run several services in one process.
    """
    name = os.environ.get("OTEL_SERVICE_NAME") or f"ringserve-{service}"
    resource = Resource.create({"service.name": name})
    readers: list[MetricReader] = []
    otlp_on = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")) and os.environ.get("OTEL_SDK_DISABLED") != "true"
    traces_exported = otlp_on and _signal_enabled("OTEL_TRACES_EXPORTER")
    # With no exporter, spans are not recorded at all (ALWAYS_OFF: no attributes, events or span
    # objects kept), but still carry trace ids for the logs and the W3C headers. With one, the
    # SDK's sampler follows OTEL_TRACES_SAMPLER (parent-based always-on by default).
    tracer_provider = TracerProvider(resource=resource, sampler=None if traces_exported else ALWAYS_OFF)
    if otlp_on:
        span_exporter, metric_exporter = _otlp_exporters()
        if traces_exported:
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter()))
        if _signal_enabled("OTEL_METRICS_EXPORTER"):
            readers.append(PeriodicExportingMetricReader(metric_exporter()))
    metrics_server = None
    if metrics_port > 0:
        endpoint = _prometheus_endpoint(metrics_port)
        if endpoint is not None:
            reader, metrics_server = endpoint
            readers.append(reader)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(
        tracer=tracer_provider.get_tracer(name),
        meter=meter_provider.get_meter(name),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics_server=metrics_server,
    )
