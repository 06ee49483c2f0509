"""The gateway's span is the root of a request's trace, or joins the caller's when the HTTP request
carries a W3C `traceparent`; the NATS messages it sends carry that context on, so the scheduler's
`scheduler.generate` (and everything under it) lands in the same trace."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS
from opentelemetry import context as otel_context
from opentelemetry import propagate

from shared.bus import inject_headers

SPAN_NAME = "gateway.request"


def http_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context of an HTTP request's `traceparent`/`tracestate` (empty without them)."""
    return propagate.extract(dict(headers))


class TracingConnection:
    """A NATS connection whose publishes and requests carry the current trace context in their
    headers, so RingserveClient's messages join the gateway's trace. Everything else is the
    connection's own."""

    def __init__(self, nc: NATS):
        self._nc = nc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        await self._nc.publish(subject, payload, reply=reply, headers=inject_headers(headers))

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5, old_style: bool = False,
                      headers: dict[str, str] | None = None) -> Any:
        return await self._nc.request(subject, payload, timeout=timeout, old_style=old_style,
                                      headers=inject_headers(headers))
