"""A thin layer over nats-py: connection with reconnects, typed request/reply over msgpack,
queue-group subscriptions whose handlers never kill the service, and OpenTelemetry context
carried in message headers (W3C traceparent)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry import propagate
from pydantic import BaseModel

from shared import codec
from shared.errors import BusError, PayloadTooLarge
from shared.settings import Settings

log = structlog.get_logger("bus")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Msg], Awaitable[None]]


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract_context(msg: Msg) -> otel_context.Context:
    return propagate.extract(dict(msg.headers or {}))


CONNECT_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 0.5
FIRST_CONNECT_BOUND_S = 30.0


def nats_auth_options(settings: Settings) -> dict[str, Any]:
    """nats.connect's credentials and TLS options from the settings (every connection uses these)."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options.update(user=settings.nats_user, password=settings.nats_password or "")
    if settings.nats_tls_ca_file or settings.nats_tls_cert_file:
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.nats_tls_ca_file)
        if settings.nats_tls_cert_file:
            tls.load_cert_chain(settings.nats_tls_cert_file, settings.nats_tls_key_file)
        options["tls"] = tls
    return options


async def connect(settings: Settings, name: str) -> NATS:
    async def _disconnected() -> None:
        log.warning("nats_disconnected", client=name)

    async def _reconnected() -> None:
        log.info("nats_reconnected", client=name)

    async def _error(exc: Exception) -> None:
        log.warning("nats_error", client=name, error=str(exc))

    kwargs = nats_auth_options(settings)
    # The first connection is bounded (nats-py waits forever on a TLS handshake it cannot
    # complete): a service that cannot reach NATS at start fails, and is restarted.
    return await asyncio.wait_for(nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT_S,
        connect_timeout=CONNECT_TIMEOUT_S,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
        **kwargs,
    ), FIRST_CONNECT_BOUND_S)


class Bus:
    """Typed messaging for one service. Internal messages are msgpack-encoded pydantic models."""

    def __init__(self, nc: NATS, name: str):
        self.nc = nc
        self.name = name
        self._subs: list[Subscription] = []

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def publish(self, subject: str, message: BaseModel, headers: dict[str, str] | None = None) -> None:
        await self.nc.publish(subject, self._checked(codec.encode(message), subject), headers=inject_headers(headers))

    async def publish_raw(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        await self.nc.publish(subject, self._checked(data, subject), headers=inject_headers(headers))

    async def request(
        self,
        subject: str,
        message: BaseModel,
        reply_model: type[M],
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> M:
        data = self._checked(codec.encode(message), subject)
        try:
            msg = await self.nc.request(subject, data, timeout=timeout, headers=inject_headers(headers))
        except nats.errors.NoRespondersError as exc:
            raise BusError(f"no responders on {subject}") from exc
        except nats.errors.TimeoutError as exc:
            raise BusError(f"timeout after {timeout:.1f}s on {subject}") from exc
        return codec.decode(msg.data, reply_model)

    async def reply(self, msg: Msg, message: BaseModel) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, codec.encode(message), headers=inject_headers())

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Subscription:
        """Subscribe with a handler that runs under the sender's trace context and whose
        exceptions are logged, never propagated: one bad message never stops a service."""

        async def _safe(msg: Msg) -> None:
            token = otel_context.attach(extract_context(msg))
            try:
                await handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handler_failed", subject=msg.subject, service=self.name)
            finally:
                otel_context.detach(token)

        sub = await self.nc.subscribe(subject, queue=queue, cb=_safe, pending_msgs_limit=65536)
        self._subs.append(sub)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        try:
            await sub.unsubscribe()
        except nats.errors.BadSubscriptionError:  # the connection closed it already
            pass

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    async def close(self) -> None:
        """Close at once, without draining (a client whose own loop is ending)."""
        if not self.nc.is_closed:
            await self.nc.close()

    async def drain(self) -> None:
        for sub in self._subs:
            try:
                await sub.drain()
            except Exception:  # already closed
                pass
        if not self.nc.is_closed:
            await self.nc.drain()

    def _checked(self, data: bytes, subject: str) -> bytes:
        if len(data) > self.nc.max_payload:
            raise PayloadTooLarge(f"message of {len(data)} bytes exceeds the bus max payload {self.nc.max_payload} ({subject})")
        return data
