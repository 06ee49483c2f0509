"""`ringserve trace`: the spans of a finished request, fetched from Jaeger's query API and
printed as one indented timeline per trace."""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

from services.cli.terminal import EXIT_ERROR, EXIT_OK
from shared.settings import Settings

JAEGER_URL = "http://127.0.0.1:16686"
# The service whose spans carry the `request_id` tag (OTEL service name of the scheduler).
TRACE_SERVICE = "ringserve-scheduler"
TRACE_LOOKBACK_S = 24 * 3600
TRACE_SEARCH_LIMIT = 20
JAEGER_TIMEOUT_S = 10.0
TIMELINE_WIDTH = 24
TRACE_ID = re.compile(r"^[0-9a-f]{16}([0-9a-f]{16})?$")


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
