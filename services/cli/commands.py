"""`ringserve generate`, `status`, `health` and `serve`: one request, the scheduler's status (with
the kvstore's Redis tier), this host's health files, one service in this process."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from nats.aio.client import Client as NATS

from services.cli.stack import http_url
from services.cli.terminal import EXIT_ERROR, EXIT_OK, format_status, print_error, stream_to_terminal, summary_line
from shared import subjects
from shared.bus import Bus
from shared.client import RingserveClient, RingserveError
from shared.kv.messages import KVStats, KVStatsRequest
from shared.service import health_file
from shared.settings import Settings

# A service is healthy while its health file is younger than this many heartbeat intervals.
HEALTH_HEARTBEATS = 3
# The gateway is healthy when its GET /health also answers 200 within this long.
GATEWAY_SERVICE = "gateway"
HEALTH_HTTP_PATH = "/health"
HEALTH_HTTP_TIMEOUT_S = 3.0
# `ringserve status` asks the kvstore for the Redis tier's use beside the scheduler's status (the
# scheduler's reply carries the workers' tiers only); it waits this long at most for the answer.
KV_STATS_TIMEOUT_S = 0.5


def generate_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": args.text}
    for field in ("max_new_tokens", "temperature", "seed", "request_id"):
        value = getattr(args, field)
        if value is not None:
            request[field] = value
    return request


async def cmd_generate(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    try:
        client = await RingserveClient.connect(settings)
        try:
            reply = await stream_to_terminal(client, generate_request(args), out, err, print_text=not args.json,
                                             timeout=args.timeout)
        finally:
            await client.close()
    except RingserveError as exc:
        return print_error(exc, err)
    if args.json:
        print(reply.model_dump_json(indent=2), file=out)
    print(summary_line(reply), file=err)
    return EXIT_OK


async def kv_store_stats(nc: NATS, timeout: float = KV_STATS_TIMEOUT_S) -> KVStats | None:
    """The kvstore's stats (the Redis tier's use and budget); None when no kvstore answers or these
    credentials may not ask (a tenant's reach only the public API)."""
    try:
        return await Bus(nc, "cli").request(subjects.KV_STATS, KVStatsRequest(), KVStats, timeout=timeout)
    except Exception:  # no responders, timeout, permission denied: the status goes without the line
        return None


async def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    try:
        client = await RingserveClient.connect(settings)
        # asked beside the scheduler's status, so the status takes no longer than the slower of the two
        kv_task = asyncio.create_task(kv_store_stats(client.nc))
        try:
            status = await client.status()
            kv = await kv_task
        finally:
            kv_task.cancel()
            await client.close()
    except RingserveError as exc:
        return print_error(exc, err)
    if args.json:
        body = status.model_dump(mode="json")
        if kv is not None:
            body["kv_store"] = kv.model_dump(mode="json")
        print(json.dumps(body, indent=2), file=out)
    else:
        print(format_status(status, kv), file=out)
    return EXIT_OK


def health_ok(path: Path, max_age_s: float, now: float | None = None) -> bool:
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - modified <= max_age_s


def http_health_error(url: str, timeout: float = HEALTH_HTTP_TIMEOUT_S) -> str | None:
    """None when GET `url` answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"{url} answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable ({getattr(exc, 'reason', exc)})"


def cmd_health(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    path = health_file(args.name)
    max_age = HEALTH_HEARTBEATS * settings.heartbeat_interval_s
    if not health_ok(path, max_age):
        print(f"{args.name}: unhealthy ({path} missing or older than {max_age:.1f}s)", file=err)
        return EXIT_ERROR
    # The gateway heartbeats on NATS and must also answer HTTP: its health check is GET /health.
    if args.name == GATEWAY_SERVICE:
        problem = http_health_error(http_url(settings) + HEALTH_HTTP_PATH)
        if problem is not None:
            print(f"{args.name}: unhealthy ({problem})", file=err)
            return EXIT_ERROR
    print(f"{args.name}: healthy", file=out)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    # Imported lazily: the worker pulls in the model code, which the other commands never need.
    importlib.import_module(f"services.{args.name}.main").main()
    return EXIT_OK
