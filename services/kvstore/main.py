"""The kvstore service process: KV block metadata over NATS (lookup, commit, touch, pin, shard
reservations, stats).

Every request is validated with its pydantic model; a malformed one gets a `KVErrorReply` and
the service carries on. Replicas share one queue group and one metadata store in Redis. A
background task drops blocks past their TTL, forgets the shards of dead workers, derives the
budget from the Redis nodes' memory again (unless it is set: derived_budget.py) and re-checks it. Registration with
nats.micro, heartbeats and the drain on SIGTERM come from shared/service.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg
from pydantic import BaseModel

from shared import subjects
from shared.kv.messages import (
    KVErrorReply,
    KVCommitRequest,
    KVLookupRequest,
    KVPinRequest,
    KVShardRequest,
    KVStatsRequest,
    KVTouchRequest,
)
from shared.service import ServiceApp, ServiceRuntime, main as service_main, run_service, serve
from shared.settings import Settings
from services.kvstore.service import KVStoreService

log = structlog.get_logger("kvstore")


class KVStoreApp(ServiceApp):
    name = "kvstore"
    description = "metadata of stored KV blocks: prefix index, access and importance, budget, eviction, TTLs"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.service: KVStoreService | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, rt: ServiceRuntime) -> None:
        self.service = service = KVStoreService(self.settings, meter=rt.telemetry.meter)
        await service.refresh_budget()  # before the first commit is weighed against it

        async def stats(_request: KVStatsRequest) -> BaseModel:
            return await service.stats()

        routes: list[tuple[str, type[BaseModel], Callable[[BaseModel], Awaitable[BaseModel]]]] = [
            (subjects.KV_LOOKUP, KVLookupRequest, service.lookup),
            (subjects.KV_COMMIT, KVCommitRequest, service.commit),
            (subjects.KV_TOUCH, KVTouchRequest, service.touch),
            (subjects.KV_PIN, KVPinRequest, service.pin),
            (subjects.KV_SHARD, KVShardRequest, service.shard),
            (subjects.KV_STATS, KVStatsRequest, stats),
        ]
        for subject, model, method in routes:
            await serve(rt.bus, subject, model, _ignoring_msg(method), queue=subjects.SERVICE_QUEUE,
                        invalid=lambda text: KVErrorReply(error=text),
                        failed=lambda exc: KVErrorReply(error=f"internal error: {type(exc).__name__}"),
                        span=f"kvstore.{method.__name__}", tracer=rt.telemetry.tracer)
        self._sweeper = asyncio.create_task(self._sweep(service))

    async def stop(self, rt: ServiceRuntime) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        if self.service:
            await self.service.close()

    async def _sweep(self, service: KVStoreService) -> None:
        while True:
            await asyncio.sleep(self.settings.kv_sweep_interval_s)
            try:
                await service.refresh_budget()  # maxmemory may have been changed (CONFIG SET)
                expired = await service.sweep_expired()
                shards = await service.forget_stale_shards()
                evicted = await service.evict_to_budget()
                await service.stats()  # refreshes the gauges of what is stored
                if expired or evicted or shards:
                    log.info("kv_sweep", expired=expired, evicted=evicted, stale_shards=shards)
            except Exception:  # one failed sweep must not end the loop
                log.exception("kv_sweep_failed")


def _ignoring_msg(method: Callable[[BaseModel], Awaitable[BaseModel]]):
    async def handle(request: BaseModel, _msg: Msg) -> BaseModel:
        return await method(request)

    return handle


async def run(
    settings: Settings,
    instance: str | None = None,
    ready: Callable[[ServiceRuntime], Awaitable[None]] | None = None,
    install_signals: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or until a test sets `rt.stopping`), then drain."""
    await run_service(KVStoreApp(settings), settings, instance=instance, ready=ready, install_signals=install_signals)


def main() -> None:
    service_main(KVStoreApp)


if __name__ == "__main__":
    main()
