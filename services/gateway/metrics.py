"""The gateway's own metrics, served as Prometheus text on GET /metrics: requests by endpoint and
HTTP status, and their latency (to the whole response, streams included)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from shared.metrics import REQUEST_LATENCY_BUCKETS_MS

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        # A registry of its own: several gateways may share a process in tests.
        self.registry = CollectorRegistry()
        self.requests = Counter("ringserve_gateway_requests", "HTTP requests answered by the gateway",
                                ["endpoint", "status"], registry=self.registry)
        self.latency_ms = Histogram("ringserve_gateway_request_latency_ms",
                                    "time from an HTTP request to the end of its response (ms)",
                                    ["endpoint"], buckets=REQUEST_LATENCY_BUCKETS_MS, registry=self.registry)

    def record(self, endpoint: str, status: int, latency_ms: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency_ms.labels(endpoint=endpoint).observe(latency_ms)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
