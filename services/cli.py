"""The `ringserve` command: run one service, run the whole local stack, send a request, show
status, health and the trace of a request.

    ringserve up --workers 2 --demo-request
    ringserve generate "Hello" --max-new-tokens 16
    ringserve status
    ringserve health worker
    ringserve trace REQUEST_ID

Settings come from RINGSERVE_* variables, read once here and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from shared.client import RingserveClient, RingserveError
from shared.messages import DoneEvent, GenerateReply, ProgressEvent, StatusReply, TokenEvent
from shared.service import health_file
from shared.settings import Settings
from services.stack import SERVICE_NAMES, LocalStack, MissingServerError, StackError, exited_cleanly, http_url

STATE_DIR = ".ringserve"
DEMO_PROMPT = "Hello, ringserve"
DEMO_MAX_NEW_TOKENS = 16
DEFAULT_READY_TIMEOUT_S = 300.0
# A service is healthy while its health file is younger than this many heartbeat intervals.
HEALTH_HEARTBEATS = 3
# The gateway is healthy when its GET /health also answers 200 within this long.
GATEWAY_SERVICE = "gateway"
HEALTH_HTTP_PATH = "/health"
HEALTH_HTTP_TIMEOUT_S = 3.0
PROGRESS_BAR_WIDTH = 30
JAEGER_URL = "http://127.0.0.1:16686"
# The service whose spans carry the `request_id` tag (OTEL service name of the scheduler).
TRACE_SERVICE = "ringserve-scheduler"
TRACE_LOOKBACK_S = 24 * 3600
TRACE_SEARCH_LIMIT = 20
JAEGER_TIMEOUT_S = 10.0
TIMELINE_WIDTH = 24
TRACE_ID = re.compile(r"^[0-9a-f]{16}([0-9a-f]{16})?$")
# How often `up` checks that its children still run.
CHILD_CHECK_INTERVAL_S = 1.0
EXIT_OK, EXIT_ERROR, EXIT_MISSING_SERVER = 0, 1, 2
T = TypeVar("T")


# ---- pure formatting ---------------------------------------------------------------------------


def render_progress(done: int, total: int, width: int = PROGRESS_BAR_WIDTH) -> str:
    """`prefill [#######.......]  50% 512/1024 tokens`"""
    done = max(0, min(done, total))
    fraction = done / total if total > 0 else 1.0
    filled = int(fraction * width)
    return f"prefill [{'#' * filled}{'.' * (width - filled)}] {int(fraction * 100):3d}% {done}/{total} tokens"


def decode_rate(reply: GenerateReply) -> float:
    """Tokens per second after the first one (the decode speed); the overall rate for one token."""
    tokens = reply.usage.completion_tokens
    decode_ms = reply.timings.total_ms - reply.timings.ttft_ms
    if tokens > 1 and decode_ms > 0:
        return (tokens - 1) / (decode_ms / 1000)
    return tokens / (reply.timings.total_ms / 1000) if reply.timings.total_ms > 0 else 0.0


def summary_line(reply: GenerateReply) -> str:
    return (f"{reply.usage.completion_tokens} tokens, ttft {reply.timings.ttft_ms:.0f} ms, "
            f"{decode_rate(reply):.1f} tok/s, finish {reply.finish_reason} ({reply.request_id})")


def token_text(event: TokenEvent) -> str:
    """The text a token adds; its id in brackets when the model has no tokenizer."""
    return event.text if event.text is not None else f"[{event.token_id}]"


def unprinted_tail(final_text: str | None, printed: str) -> str:
    """What the final text holds beyond the streamed increments: a token's text is held back
    while its bytes end mid-character, and the final text flushes it."""
    if final_text and final_text.startswith(printed):
        return final_text[len(printed):]
    return ""


def format_status(status: StatusReply) -> str:
    lines = [
        f"model: {status.model or '(none)'}",
        f"world: generation {status.world_generation}, {'ready' if status.world_ready else 'not ready'}"
        f"{', ' + status.world_backend if status.world_backend else ''}"
        f"{', members ' + ' '.join(status.world_members) if status.world_members else ''}",
        f"requests: {status.active_requests} active, {status.queued_requests} queued",
    ]
    # waiting for workers with room, in the order the scheduler will place them
    lines += [f"  #{q.place}  {q.request_id}  {q.prefill_tokens} prefill tokens  waited {q.waited_s:.1f}s"
              for q in status.queue]
    lines.append(f"workers: {len(status.workers)}")
    for w in status.workers:
        state = "busy" if w.busy else "idle"
        lines.append(f"  {w.worker_id}  {w.device}  {state}  {w.active_requests} requests  "
                     f"{w.kv_tokens}{'' if w.kv_capacity_tokens is None else f'/{w.kv_capacity_tokens}'} kv tokens  "
                     f"seen {w.last_seen_s:.1f}s ago")
    lines.append(f"services: {len(status.services)}")
    for svc in status.services:
        lines.append(f"  {svc.service}  {svc.instance}  {'draining' if svc.draining else 'serving'}  "
                     f"seen {svc.last_seen_s:.1f}s ago")
    return "\n".join(lines)


def health_ok(path: Path, max_age_s: float, now: float | None = None) -> bool:
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - modified <= max_age_s


def trace_query_url(base: str, request_id: str, service: str, now_s: float) -> str:
    """A trace id is fetched directly; anything else is searched as the `request_id` tag."""
    base = base.rstrip("/")
    if TRACE_ID.match(request_id):
        return f"{base}/api/traces/{request_id}"
    query = {
        "service": service,
        "tags": json.dumps({"request_id": request_id}),
        "start": int((now_s - TRACE_LOOKBACK_S) * 1e6),  # Jaeger wants microseconds
        "end": int(now_s * 1e6),
        "limit": TRACE_SEARCH_LIMIT,
    }
    return f"{base}/api/traces?{urllib.parse.urlencode(query)}"


def _parent_id(span: dict[str, Any], span_ids: set[str]) -> str | None:
    for ref in span.get("references") or []:
        if ref.get("refType", "CHILD_OF") == "CHILD_OF" and ref.get("spanID") in span_ids:
            return ref["spanID"]
    return None


def _timeline(start: float, end: float, t0: float, length: float, width: int = TIMELINE_WIDTH) -> str:
    """`|   ====        |`: where a span lies within the whole trace."""
    if length <= 0:
        return "|" + "=" * width + "|"
    left = min(width - 1, int((start - t0) / length * width))
    right = max(left + 1, min(width, round((end - t0) / length * width)))
    return "|" + " " * left + "=" * (right - left) + " " * (width - right) + "|"


def _is_error(span: dict[str, Any]) -> bool:
    return any(t.get("key") == "error" and t.get("value") in (True, "true") for t in span.get("tags") or [])


def _format_one_trace(trace: dict[str, Any]) -> list[str]:
    spans = trace.get("spans") or []
    if not spans:
        return [f"trace {trace.get('traceID', '?')}: no spans"]
    processes = trace.get("processes") or {}
    by_id = {s["spanID"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        children.setdefault(_parent_id(span, set(by_id)), []).append(span)
    for group in children.values():
        group.sort(key=lambda s: (s.get("startTime", 0), s.get("operationName", "")))
    t0 = min(s.get("startTime", 0) for s in spans)
    t_end = max(s.get("startTime", 0) + s.get("duration", 0) for s in spans)
    length = t_end - t0  # microseconds
    lines = [f"trace {trace.get('traceID', '?')}  {len(spans)} spans  {length / 1000:.1f} ms"]
    seen: set[str] = set()

    def walk(span: dict[str, Any], depth: int) -> None:
        if span["spanID"] in seen:  # a malformed trace with a reference cycle
            return
        seen.add(span["spanID"])
        start, duration = span.get("startTime", 0), span.get("duration", 0)
        service = processes.get(span.get("processID"), {}).get("serviceName", "?")
        error = "  [error]" if _is_error(span) else ""
        lines.append(f"{(start - t0) / 1000:9.1f} ms {duration / 1000:9.1f} ms "
                     f"{_timeline(start, start + duration, t0, length)} "
                     f"{'  ' * depth}{service}: {span.get('operationName', '?')}{error}")
        for child in children.get(span["spanID"], []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return lines


def format_trace(jaeger_json: dict[str, Any]) -> str:
    """Jaeger query API JSON (`{"data": [trace, ...]}`) -> one indented timeline per trace:
    offset from the trace start, duration, position bar, then `service: operation` by depth."""
    traces = jaeger_json.get("data") or []
    if not traces:
        return "no trace found"
    return "\n\n".join("\n".join(_format_one_trace(t)) for t in traces)


# ---- commands ----------------------------------------------------------------------------------


def _error(exc: RingserveError, err: TextIO) -> int:
    print(f"error: {exc.code}: {exc.message}", file=err)
    return EXIT_ERROR


async def stream_to_terminal(client: RingserveClient, request: dict[str, Any], out: TextIO, err: TextIO,
                             print_text: bool = True, timeout: float | None = None) -> GenerateReply:
    """Print text increments on `out` as tokens arrive and a progress bar on `err` during prefill."""
    bar_shown = False
    printed: list[str] = []
    async for event in client.stream(request, timeout=timeout):
        if isinstance(event, ProgressEvent):
            print("\r" + render_progress(event.done_tokens, event.total_tokens), end="", file=err, flush=True)
            bar_shown = True
            continue
        if bar_shown:  # the first token ends prefill: leave the finished bar on its own line
            print(file=err, flush=True)
            bar_shown = False
        if isinstance(event, TokenEvent) and print_text:
            printed.append(token_text(event))
            print(printed[-1], end="", file=out, flush=True)
        elif isinstance(event, DoneEvent):
            reply = GenerateReply.model_validate(event.model_dump(exclude={"type"}))
            if print_text:
                print(unprinted_tail(reply.text, "".join(printed)), file=out, flush=True)
            return reply
    raise RingserveError("internal", "the stream ended without a done message")


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
        return _error(exc, err)
    if args.json:
        print(reply.model_dump_json(indent=2), file=out)
    print(summary_line(reply), file=err)
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    try:
        client = await RingserveClient.connect(settings)
        try:
            status = await client.status()
        finally:
            await client.close()
    except RingserveError as exc:
        return _error(exc, err)
    print(status.model_dump_json(indent=2) if args.json else format_status(status), file=out)
    return EXIT_OK


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


def cmd_trace(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    url = trace_query_url(args.jaeger, args.request_id, args.service, time.time())
    try:
        with urllib.request.urlopen(url, timeout=JAEGER_TIMEOUT_S) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            print(f"error: no trace found for {args.request_id}", file=err)
        else:
            print(f"error: Jaeger at {args.jaeger} answered HTTP {exc.code}", file=err)
        return EXIT_ERROR
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: Jaeger is not reachable at {args.jaeger} ({getattr(exc, 'reason', exc)}); start it "
              f"(docker compose up jaeger) or pass --jaeger URL", file=err)
        return EXIT_ERROR
    except ValueError:
        print(f"error: Jaeger at {args.jaeger} did not answer JSON", file=err)
        return EXIT_ERROR
    if not body.get("data"):
        print(f"error: no trace found for {args.request_id} (service {args.service})", file=err)
        return EXIT_ERROR
    print(format_trace(body), file=out)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    # Imported lazily: the worker pulls in the model code, which the other commands never need.
    importlib.import_module(f"services.{args.name}.main").main()
    return EXIT_OK


async def _until_stopped(stack: LocalStack, stop: asyncio.Event, err: TextIO) -> None:
    """Until Ctrl-C/SIGTERM, restarting services that die (the others keep serving); raises
    StackError if a server dies."""
    while not stop.is_set():
        for line in stack.supervise():
            print(line, file=err, flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=CHILD_CHECK_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def _race(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None when `stop` is set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def ready_message(status: StatusReply, settings: Settings, log_dir: Path) -> str:
    return "\n".join([
        f"ringserve is up: {len(status.workers)} worker(s), model {status.model}, NATS {settings.nats_url}; "
        f"logs in {log_dir}",
        f'  send a request:   ringserve generate "Hello" --max-new-tokens {DEMO_MAX_NEW_TOKENS}',
        f"  any NATS client:  nats request ringserve.v1.generate "
        f"'{{\"prompt\": \"Hello\", \"max_new_tokens\": {DEMO_MAX_NEW_TOKENS}}}'",
        f"  OpenAI HTTP API:  curl {http_url(settings)}/v1/completions -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{status.model}\", \"prompt\": \"Hello\", \"max_tokens\": {DEMO_MAX_NEW_TOKENS}}}'",
        "  stop:             Ctrl-C",
    ])


def stop_message(exit_codes: dict[str, int]) -> str:
    unclean = [f"{name} ({code})" for name, code in exit_codes.items() if not exited_cleanly(name, code)]
    if unclean:
        return "stopped; exited uncleanly: " + ", ".join(unclean)
    return "stopped; all exited cleanly"


async def cmd_up(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = LocalStack(settings, workers=args.workers, model=args.model, device=args.device,
                       state_dir=Path(args.state_dir))
    try:
        print(f"starting ringserve: {args.workers} worker(s), model {stack.model}, device {stack.device}",
              file=err, flush=True)
        stack.start()
        status = await _race(stack.wait_ready(args.ready_timeout), stop)
        if status is None:
            return EXIT_OK
        print(ready_message(status, settings, stack.log_dir), file=out, flush=True)
        if args.demo_request:
            print(f"demo request: {DEMO_PROMPT!r}", file=out, flush=True)
            client = await RingserveClient.connect(settings)
            try:
                request = {"prompt": DEMO_PROMPT, "max_new_tokens": DEMO_MAX_NEW_TOKENS}
                reply = await _race(stream_to_terminal(client, request, out, err), stop)
            finally:
                await client.close()
            if reply is not None:
                print(summary_line(reply), file=out, flush=True)
        await _until_stopped(stack, stop, err)
        return EXIT_OK
    except MissingServerError as exc:
        print(str(exc), file=err)
        return EXIT_MISSING_SERVER
    except (StackError, RingserveError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    finally:
        print("stopping ringserve", file=err, flush=True)
        print(stop_message(stack.stop()), file=err, flush=True)


# ---- arguments ---------------------------------------------------------------------------------


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
