"""uvicorn inside a ringserve service: the service process owns SIGTERM/SIGINT (run_service
drains on them), so uvicorn must not install handlers of its own, and it stops when told."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

# uvicorn logs through the standard library; ringserve's structlog set-up formats those records.
UVICORN_LOG_CONFIG = None


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # run_service handles the signals


class HttpServer:
    def __init__(self, app: Starlette, host: str, port: int, drain_s: float, log_level: str):
        config = uvicorn.Config(app, host=host, port=port, log_config=UVICORN_LOG_CONFIG, log_level=log_level,
                                access_log=False, timeout_graceful_shutdown=max(drain_s, 0.0) or None,
                                lifespan="off")
        self.server = EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Listening when this returns; raises if the port cannot be bound."""
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one chosen for port 0)."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let open responses finish within the drain, then close."""
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
