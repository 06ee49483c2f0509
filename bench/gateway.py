"""What the HTTP gateway adds per request: the same short greedy request, one at a time, through
the OpenAI API over HTTP (the gateway) and directly over NATS with RingserveClient, interleaved
so that both meet the same stack state. Reports the p50 (and p90) of each and their difference.

Starts, as `ringserve up` does (`LocalStack`), nats-server and redis-server on free ports, then
kvstore, fusion, scheduler, the gateway and one worker with the demo model on the CPU.

    python bench/gateway.py --out gateway.json
    python bench/gateway.py --requests 50 --max-tokens 1   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for shared.* and services.*

from services.cli.stack import LocalStack, http_url  # noqa: E402
from shared.client import RingserveClient  # noqa: E402
from shared.settings import Settings  # noqa: E402

DEFAULT_WORKDIR = ".ringserve/bench-gateway"
DEFAULT_REQUESTS = 200
DEFAULT_WARMUP = 20
DEFAULT_MAX_TOKENS = 4
PROMPT = "Hello, ringserve"
READY_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 60.0
MS_PER_S = 1000.0
P90 = 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def over_http(http: httpx.AsyncClient, max_tokens: int) -> float:
    started = time.perf_counter()
    response = await http.post("/v1/completions", json={"model": "demo", "prompt": PROMPT, "max_tokens": max_tokens,
                                                         "temperature": 0})
    response.raise_for_status()
    return (time.perf_counter() - started) * MS_PER_S


async def over_nats(client: RingserveClient, max_tokens: int) -> float:
    started = time.perf_counter()
    await client.generate({"prompt": PROMPT, "max_new_tokens": max_tokens, "temperature": 0})
    return (time.perf_counter() - started) * MS_PER_S


async def measure(settings: Settings, args: argparse.Namespace) -> dict:
    client = await RingserveClient.connect(settings)
    try:
        async with httpx.AsyncClient(base_url=http_url(settings), timeout=HTTP_TIMEOUT_S) as http:
            for _ in range(args.warmup):
                await over_http(http, args.max_tokens)
                await over_nats(client, args.max_tokens)
            http_ms, nats_ms = [], []
            for i in range(args.requests):
                # interleaved, each path first every other time: neither meets a warmer stack
                if i % 2:
                    http_ms.append(await over_http(http, args.max_tokens))
                    nats_ms.append(await over_nats(client, args.max_tokens))
                else:
                    nats_ms.append(await over_nats(client, args.max_tokens))
                    http_ms.append(await over_http(http, args.max_tokens))
    finally:
        await client.close()
    return {
        "http_p50_ms": statistics.median(http_ms), "http_p90_ms": percentile(http_ms, P90),
        "nats_p50_ms": statistics.median(nats_ms), "nats_p90_ms": percentile(nats_ms, P90),
        "overhead_p50_ms": statistics.median(http_ms) - statistics.median(nats_ms),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured requests per path first")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nats_port, redis_port = free_port(), free_port()
    settings = Settings(nats_url=f"nats://127.0.0.1:{nats_port}", redis_url=f"redis://127.0.0.1:{redis_port}/0",
                        http_host="127.0.0.1", http_port=free_port(), model="demo", device="cpu")
    stack = LocalStack(settings, workers=1, state_dir=Path(args.workdir) / "state")
    try:
        stack.start()
        asyncio.run(stack.wait_ready(READY_TIMEOUT_S))
        figures = asyncio.run(measure(settings, args))
    finally:
        stack.stop()
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": f"CPU: {platform.processor() or platform.machine()}, demo model, 1 worker",
        "command": "python bench/gateway.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "requests": args.requests, "max_tokens": args.max_tokens, **{k: round(v, 2) for k, v in figures.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
