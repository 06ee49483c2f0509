"""The Redis nodes of the KV store, and what happens when one is down.

A KV block is a cache entry: losing it costs a recompute, never a failed request. So every Redis
call goes through `RedisNodes.call`, which turns a connection error or timeout into a default
value (a miss, a no-op). The first failure of an outage is logged once; later calls skip the node
without waiting until `retry_s` has passed, then try again, and the first success logs the
recovery. redis-py reconnects by itself, so a restarted Redis is picked up on the next try.

The health of a server is shared by every client of it in the process (a worker has two: the
block store and the shard store), so an outage is logged once per process, not once per client.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs, urlsplit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.kv.ring import HashRing
from shared.settings import Settings

log = structlog.get_logger("kv")
T = TypeVar("T")
# Errors that mean "the node is unreachable", as opposed to a bug in the command.
UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
STALE_CONNECTION_RETRIES = 1
DEFAULT_REDIS_PORT = 6379


@dataclass
class _Health:
    down: bool = False
    retry_at: float = 0.0
    outages: int = 0  # outages begun so far: each client drops its pooled connections once per outage


# server ("host:port") -> its health, shared by all RedisNodes of this process. Only ever touched
# from event-loop code, and a process's Redis clients live on one loop.
_HEALTH: dict[str, _Health] = {}


def server_address(url: str) -> str:
    """What identifies a Redis server in a URL: its address (two databases of one server fail
    together, and share one memory)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or DEFAULT_REDIS_PORT}" if parts.hostname else url


def redact(url: str) -> str:
    """A node URL fit for logs: no password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port}").geturl()


def node_label(url: str) -> str:
    """A node's name in metrics: `host:port` of its URL (`/db` appended when the database is not 0,
    so two databases of one server stay apart); a unix socket's path. Never a user or password."""
    parts = urlsplit(url)
    query_db = parse_qs(parts.query).get("db", ["0"])[0]
    if parts.scheme == "unix":
        return parts.path if query_db in ("", "0") else f"{parts.path}/{query_db}"
    host = parts.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:
        port = DEFAULT_REDIS_PORT
    db = parts.path.strip("/") or query_db
    where = f"{host}:{port}"
    return where if db in ("", "0") else f"{where}/{db}"


class RedisNodes:
    """One asyncio Redis client per node URL, the hash ring over them, and outage handling."""

    def __init__(
        self, urls: list[str], timeout_s: float, retry_s: float, max_connections: int, decode_responses: bool = False
    ):
        if not urls:
            raise ValueError("at least one Redis URL is needed")
        self.urls = urls
        self.ring = HashRing(urls)
        # Node i's metric label (its URL, which the ring hashes, may carry a password).
        self.labels = [node_label(url) for url in urls]
        self.retry_s = retry_s
        # A blocking pool: callers beyond `max_connections` wait for a free connection instead of failing.
        self.clients = [
            Redis(
                connection_pool=BlockingConnectionPool.from_url(
                    url,
                    max_connections=max_connections,
                    timeout=timeout_s,
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                    # One immediate retry on a fresh connection: a pooled connection to a Redis that has
                    # restarted fails once. Anything longer is our outage handling's business.
                    retry=Retry(NoBackoff(), STALE_CONNECTION_RETRIES),
                    decode_responses=decode_responses,
                )
            )
            for url in urls
        ]
        self._health = [_HEALTH.setdefault(server_address(url), _Health()) for url in urls]
        # per node: the outage whose stale connections this client has already dropped
        self._dropped = [0] * len(urls)

    @classmethod
    def from_settings(cls, settings: Settings, decode_responses: bool = False) -> "RedisNodes":
        return cls(
            settings.redis_urls,
            timeout_s=settings.kv_redis_timeout_s,
            retry_s=settings.kv_redis_retry_s,
            max_connections=settings.kv_io_concurrency,
            decode_responses=decode_responses,
        )

    def node_for(self, key: str) -> int:
        return self.ring.node_for(key)

    def is_up(self, node: int) -> bool:
        health = self._health[node]
        return not health.down or time.monotonic() >= health.retry_at

    async def call(self, node: int, fn: Callable[[Redis], Awaitable[T]], default: T) -> T:
        """`await fn(client)` on one node, or `default` if the node is down or the call fails to reach it."""
        health = self._health[node]
        if not self.is_up(node):
            return default
        try:
            result = await fn(self.clients[node])
        except UNAVAILABLE_ERRORS as exc:
            if not health.down:  # the outage starts (for every client of this server in the process)
                health.down = True
                health.outages += 1
                log.warning("kv_redis_unavailable", node=redact(self.urls[node]), error=str(exc) or type(exc).__name__)
            health.retry_at = time.monotonic() + self.retry_s
            if self._dropped[node] != health.outages:
                self._dropped[node] = health.outages
                # Every pooled connection is to the old server: drop them all, the next try connects afresh.
                await self.clients[node].connection_pool.disconnect()
            return default
        if health.down:
            health.down = False
            log.info("kv_redis_recovered", node=redact(self.urls[node]))
        return result

    async def close(self) -> None:
        for client in self.clients:
            try:
                await client.aclose()
            except Exception:  # closing a client whose server is gone
                pass
