"""What every ringserve service process shares: NATS connection, `nats.micro` registration (so
`$SRV.PING`/`$SRV.INFO` discover it), heartbeats, a health file for container health checks,
a clean drain on SIGTERM/SIGINT, and typed endpoints (`serve`).

A service supplies `start(runtime)` (subscribe its subjects with `serve`) and optionally
`heartbeat()` and `stop()`; `run_service` wires the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog
from nats.micro import add_service
from nats.micro.service import Service, ServiceConfig
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from shared import codec, subjects
from shared.bus import Bus, connect
from shared.errors import error_text
from shared.logs import setup_logging
from shared.messages import ServiceHeartbeat
from shared.settings import Settings
from shared.telemetry import Telemetry, setup_telemetry

log = structlog.get_logger("service")
VERSION = "0.1.0"
M = TypeVar("M", bound=BaseModel)


async def serve(
    bus: Bus,
    subject: str,
    model: type[M],
    handler: Callable[[M, Msg], Awaitable[BaseModel | None]],
    *,
    queue: str = "",
    invalid: Callable[[str], BaseModel] | None = None,
    failed: Callable[[Exception], BaseModel] | None = None,
    span: str | None = None,
    tracer: trace.Tracer | None = None,
    quiet: bool = False,
) -> Subscription:
    """A typed endpoint: every message on `subject` is decoded into `model` (msgpack, strictly
    validated) and handed to `handler(request, msg)`; what it returns (if anything) is the reply.

    invalid: the reply to a message that does not decode (given the error text); without it the
    message is dropped. Either way it is logged (`bad_message`), unless `quiet` (heartbeats,
    whose bad ones the scheduler logs). failed: the reply when the handler raises; without it the
    exception is logged and the sender times out. span: the name of a span around the handler
    (handlers that start their own spans leave it out), from `tracer` (the service's). A
    message never ends the service.
    """
    tracer = tracer or trace.get_tracer("ringserve.service")

    async def handle(msg: Msg) -> None:
        try:
            request = codec.decode(msg.data, model)
        except (codec.CodecError, ValidationError) as exc:
            text = error_text(f"invalid {model.__name__}: {exc}")
            if not quiet:
                log.warning("bad_message", subject=msg.subject, service=bus.name, error=text)
            if invalid is not None:
                await bus.reply(msg, invalid(text))
            return
        try:
            if span is None:
                reply = await handler(request, msg)
            else:
                with tracer.start_as_current_span(span, attributes={"subject": msg.subject}):
                    reply = await handler(request, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if failed is None:
                raise  # the bus logs it (handler_failed)
            log.exception("request_failed", subject=msg.subject, service=bus.name)
            reply = failed(exc)
        if reply is not None:
            await bus.reply(msg, reply)

    return await bus.subscribe(subject, handle, queue=queue)


def health_file(service: str) -> Path:
    """Touched on every heartbeat; `ringserve health NAME` checks its age."""
    return Path(tempfile.gettempdir()) / f"ringserve-{service}.health"


@dataclass
class ServiceRuntime:
    name: str
    instance: str
    settings: Settings
    bus: Bus
    telemetry: Telemetry
    micro: Service | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


class ServiceApp:
    """Base of the four services: override start/heartbeat/stop."""

    name: str = "service"
    description: str = ""

    async def start(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def heartbeat(self, rt: ServiceRuntime) -> BaseModel:
        return ServiceHeartbeat(service=self.name, instance=rt.instance, draining=rt.stopping.is_set())

    async def stop(self, rt: ServiceRuntime) -> None:
        """Finish what is in flight (within `settings.drain_timeout_s`), then release resources;
        subscriptions stay open until this returns."""
        return None


DRAIN_POLL_S = 0.05
# Of the drain timeout, kept for what a service does once its work is finished or given up
# (replies to cut-off requests, closing stores, leaving the world): run_service cancels stop()
# at the timeout itself.
DRAIN_CLEANUP_MARGIN_S = 1.0


def drain_budget_s(settings: Settings) -> float:
    """How long a draining service may wait for its work to finish."""
    return max(0.0, settings.drain_timeout_s - DRAIN_CLEANUP_MARGIN_S)


async def wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `done` until it holds or `timeout_s` passes; whether it held. For bounded drains."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(DRAIN_POLL_S)
    return True


async def _heartbeats(app: ServiceApp, rt: ServiceRuntime) -> None:
    """Beats until cancelled. Once stopping is set, one goes out at once (draining=True), so the
    scheduler places no new work here, and they go on while the service finishes what it holds:
    a draining service must not look dead."""
    subject = subjects.heartbeat(app.name, rt.instance)
    path = health_file(app.name)
    while True:
        try:
            await rt.bus.publish(subject, app.heartbeat(rt))
            path.write_text(str(time.time()))
        except Exception as exc:  # a disconnected bus must not end the loop
            log.warning("heartbeat_failed", error=str(exc))
        if rt.stopping.is_set():
            await asyncio.sleep(rt.settings.heartbeat_interval_s)
            continue
        try:
            await asyncio.wait_for(rt.stopping.wait(), rt.settings.heartbeat_interval_s)
        except asyncio.TimeoutError:
            pass


async def run_service(
    app: ServiceApp,
    settings: Settings,
    instance: str | None = None,
    ready: Callable[[ServiceRuntime], Awaitable[None]] | None = None,
    install_signals: bool = True,
) -> None:
    """Run `app` until SIGTERM/SIGINT (or until `rt.stopping` is set by a test), then drain."""
    instance = instance or f"{app.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    telemetry = setup_telemetry(app.name, metrics_port=settings.metrics_port)
    nc = await connect(settings, name=f"ringserve-{instance}")
    rt = ServiceRuntime(app.name, instance, settings, Bus(nc, app.name), telemetry)
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, rt.stopping.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
    rt.micro = await add_service(
        nc,
        ServiceConfig(
            name=f"ringserve-{app.name}",
            version=VERSION,
            description=app.description or app.name,
            metadata={"instance": instance},
        ),
    )
    await app.start(rt)
    beat = asyncio.create_task(_heartbeats(app, rt))
    log.info("service_started", instance=instance, nats=settings.nats_url)
    if ready is not None:
        await ready(rt)
    await rt.stopping.wait()
    log.info("service_draining", instance=instance)
    try:
        await asyncio.wait_for(app.stop(rt), settings.drain_timeout_s)
    except asyncio.TimeoutError:
        log.warning("drain_timeout", instance=instance)
    beat.cancel()
    await asyncio.gather(beat, return_exceptions=True)
    try:
        await rt.micro.stop()
    except Exception:
        pass
    await rt.bus.drain()
    telemetry.shutdown()
    health_file(app.name).unlink(missing_ok=True)
    log.info("service_stopped", instance=instance)


def main(app_factory: Callable[[Settings], ServiceApp]) -> None:
    """Entry point shared by `python -m services.<name>` and `ringserve serve <name>`."""
    settings = Settings()
    app = app_factory(settings)
    setup_logging(app.name, settings.log_level)
    asyncio.run(run_service(app, settings))
