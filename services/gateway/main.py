"""The gateway service: the OpenAI-compatible HTTP API (Starlette on uvicorn) over the NATS public
API. Stateless: run as many as you like behind a load balancer; each talks to the schedulers
through NATS like any client, with RingserveClient on the service's own connection.

Why Starlette + uvicorn: small and async-native (it runs in the service's own event loop, beside
the NATS client), streams SSE with StreamingResponse and notices client disconnects, and needs no
schema layer of its own: the pydantic models in openai_models.py already validate every body.
"""

from __future__ import annotations

import structlog

from services.gateway.app import GatewayDeps, build_app
from services.gateway.assets import load_prompt_assets
from services.gateway.auth import parse_api_keys
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import HttpServer
from services.gateway.tracing import TracingConnection
from shared.client import RingserveClient
from shared.service import ServiceApp, ServiceRuntime, drain_budget_s, main as service_main
from shared.settings import Settings

log = structlog.get_logger("gateway")


class GatewayApp(ServiceApp):
    name = "gateway"
    description = "OpenAI-compatible HTTP API over the NATS public API"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.http: HttpServer | None = None

    async def start(self, rt: ServiceRuntime) -> None:
        settings = self.settings
        assets = load_prompt_assets(settings)
        client = RingserveClient(TracingConnection(rt.bus.nc), timeout=settings.request_timeout_s)
        deps = GatewayDeps(client=client, metrics=GatewayMetrics(), tracer=rt.telemetry.tracer,
                           api_keys=parse_api_keys(settings.api_keys), max_request_bytes=settings.max_request_bytes,
                           default_max_tokens=settings.max_new_tokens_limit, template=assets.template,
                           tokenizer=assets.tokenizer)
        self.http = HttpServer(build_app(deps), settings.http_host, settings.http_port, drain_budget_s(settings),
                               settings.log_level)
        await self.http.start()
        log.info("http_listening", host=settings.http_host, port=self.http.port, api_keys=bool(deps.api_keys))

    async def stop(self, rt: ServiceRuntime) -> None:
        if self.http is not None:
            await self.http.stop()


def main() -> None:
    service_main(GatewayApp)


if __name__ == "__main__":
    main()
