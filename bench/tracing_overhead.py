"""Decode throughput with traces exported over OTLP/HTTP versus tracing off.

Runs the whole local stack (private nats-server and redis-server on free ports, every service a
process) twice per round, alternating: once with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP
receiver started here (it accepts and discards, as a collector would), once without. Each request
is timed by the scheduler; decode tokens/s = (completion_tokens - 1) / (total_ms - ttft_ms).

    python bench/tracing_overhead.py --workers 2 --requests 20 --new-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.cli.stack import LocalStack  # noqa: E402
from shared.client import RingserveClient  # noqa: E402
from shared.settings import Settings  # noqa: E402


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _measure(args, traced: bool, sink_port: int) -> list[float]:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        os.environ.pop(var, None)
    if traced:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
        os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    settings = Settings(nats_url=f"nats://127.0.0.1:{_free_port()}", redis_url=f"redis://127.0.0.1:{_free_port()}/0",
                        chunk_tokens=args.chunk_tokens)
    os.environ["RINGSERVE_CHUNK_TOKENS"] = str(args.chunk_tokens)
    stack = LocalStack(settings, workers=args.workers, state_dir=Path(tempfile.mkdtemp(prefix="ringserve-bench-")))
    stack.start()
    rates = []
    try:
        await stack.wait_ready(timeout=180)
        client = await RingserveClient.connect(settings)
        try:
            prompt = "tracing overhead " * (args.prompt_tokens // 17 + 1)
            for i in range(args.requests + 1):
                reply = await client.generate({"prompt": prompt, "max_new_tokens": args.new_tokens})
                if i == 0:
                    continue  # warm-up
                decode_ms = reply.timings.total_ms - reply.timings.ttft_ms
                if reply.usage.completion_tokens > 1 and decode_ms > 0:
                    rates.append((reply.usage.completion_tokens - 1) / decode_ms * 1000)
        finally:
            await client.close()
    finally:
        stack.stop()
    return rates


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--chunk-tokens", type=int, default=32, help="small, so the prompt spans the workers")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for traced in (False, True):
            results[traced] += await _measure(args, traced, server.server_port)
    server.shutdown()
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"decode tokens/s (median of {len(results[False])} requests each): tracing off {off:.1f}, "
          f"exported {on:.1f}: {100 * (off - on) / off:+.1f}% slower with tracing")


if __name__ == "__main__":
    asyncio.run(main())
