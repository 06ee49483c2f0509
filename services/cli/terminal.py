"""What the `ringserve` commands print on a terminal: the prefill progress bar, streamed text,
the summary line, the status table, errors; and the exit statuses they return."""

from __future__ import annotations

from typing import Any, TextIO

from shared.client import RingserveClient, RingserveError
from shared.kv.messages import KVStats
from shared.messages import DoneEvent, GenerateReply, ProgressEvent, StatusReply, TokenEvent, WorkerStatus

PROGRESS_BAR_WIDTH = 30
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
BYTE_UNIT_STEP = 1024
EXIT_OK, EXIT_ERROR, EXIT_MISSING_SERVER = 0, 1, 2


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


def format_bytes(n: int) -> str:
    """`0 B`, `512 B`, `1.5 KiB`, `12.0 GiB`."""
    value, unit = float(n), BYTE_UNITS[0]
    for unit in BYTE_UNITS:
        if abs(value) < BYTE_UNIT_STEP or unit == BYTE_UNITS[-1]:
            break
        value /= BYTE_UNIT_STEP
    return f"{n} B" if unit == BYTE_UNITS[0] else f"{value:.1f} {unit}"


def worker_tiers(w: WorkerStatus) -> str:
    """A worker's prefix-cache tiers: `tiers: pool 3 pages 1.5 MiB, host 2.0 MiB of 4.0 GiB`."""
    host = (f"host {format_bytes(w.host_tier_bytes)} of {format_bytes(w.host_tier_limit_bytes)}"
            if w.host_tier_limit_bytes else "host off")
    return f"tiers: pool {w.resident_pages} pages {format_bytes(w.resident_bytes)}, {host}"


def kv_store_line(kv: KVStats) -> str:
    """The Redis tier, from the kvstore's stats: `kv store (redis): 1.2 GiB of 12.8 GiB budget (maxmemory), ...`."""
    budget = f"{format_bytes(kv.budget_bytes)} budget ({kv.budget_source or 'unknown'})"
    if kv.error:
        return f"kv store (redis): {kv.error}; {budget}"
    return (f"kv store (redis): {format_bytes(kv.total_bytes)} of {budget}, {kv.blocks} blocks, "
            f"{kv.shards} shards, hit rate {kv.hit_rate:.0%}")


def format_status(status: StatusReply, kv: KVStats | None = None) -> str:
    """The status table; `kv`: the kvstore's stats (the Redis tier), when they could be asked."""
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
        lines.append(f"    {worker_tiers(w)}")
    if kv is not None:
        lines.append(kv_store_line(kv))
    lines.append(f"services: {len(status.services)}")
    for svc in status.services:
        lines.append(f"  {svc.service}  {svc.instance}  {'draining' if svc.draining else 'serving'}  "
                     f"seen {svc.last_seen_s:.1f}s ago")
    return "\n".join(lines)


def print_error(exc: RingserveError, err: TextIO) -> int:
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
