"""The `ringserve` command's arguments and dispatch: run one service, run the whole local stack,
send a request, show status, health and the trace of a request.

Settings come from RINGSERVE_* variables, read once here and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from services.cli.commands import cmd_generate, cmd_health, cmd_serve, cmd_status
from services.cli.stack import SERVICE_NAMES
from services.cli.traces import JAEGER_URL, TRACE_SERVICE, cmd_trace
from services.cli.up import DEFAULT_READY_TIMEOUT_S, DEMO_PROMPT, STATE_DIR, cmd_up
from shared.settings import Settings


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringserve", description="Distributed long-context LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one service in this process")
    serve.add_argument("name", choices=SERVICE_NAMES)

    up = commands.add_parser("up", help="run the whole stack locally (servers, services) until Ctrl-C")
    up.add_argument("--model", help="Hugging Face checkpoint directory, or 'demo' (default: RINGSERVE_MODEL)")
    up.add_argument("--workers", type=_positive_int, default=1)
    up.add_argument("--device", choices=("cpu", "cuda"), help="default: RINGSERVE_DEVICE")
    up.add_argument("--demo-request", action="store_true", help=f"send {DEMO_PROMPT!r} once ready")
    up.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, metavar="SECONDS")
    up.add_argument("--state-dir", default=STATE_DIR, help="logs and the NATS store of servers it starts")

    gen = commands.add_parser("generate", help="send a prompt and stream the answer")
    gen.add_argument("text")
    gen.add_argument("--max-new-tokens", type=_positive_int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--request-id")
    gen.add_argument("--json", action="store_true", help="print the final reply as JSON instead of the text")
    gen.add_argument("--timeout", type=float, metavar="SECONDS", help="longest silence between two messages")

    status = commands.add_parser("status", help="model, workers and load")
    status.add_argument("--json", action="store_true")

    health = commands.add_parser("health", help="exit 0 if the service on this host heartbeats")
    health.add_argument("name", choices=SERVICE_NAMES)

    trace = commands.add_parser("trace", help="the span tree of a finished request, from Jaeger")
    trace.add_argument("request_id", help="a request id, or a trace id")
    trace.add_argument("--jaeger", default=JAEGER_URL, metavar="URL")
    trace.add_argument("--service", default=TRACE_SERVICE, help="Jaeger service whose spans carry request_id")
    return parser


COMMANDS = {
    "serve": cmd_serve,
    "up": cmd_up,
    "generate": cmd_generate,
    "status": cmd_status,
    "health": cmd_health,
    "trace": cmd_trace,
}


def run(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    command = COMMANDS[args.command]
    result = command(args, settings, out or sys.stdout, err or sys.stderr)
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
