"""Logs as the observability contract asks: structlog JSON from every service, one info event per
state change of a request, each carrying request_id, trace_id and span_id (one trace id per
request across services, with no OTLP exporter configured), and nothing logged per token."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import nats
import pytest

from shared import subjects
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
# The scheduler's lifecycle of a request that runs to its end, in order, each exactly once.
LIFECYCLE = ["request_received", "request_admitted", "prefix_lookup", "request_placed", "prefill_started",
             "first_token", "request_done"]
MAX_PROMPT_TOKENS = 64


def read_log(path: Path) -> list[dict]:
    """Every line of one service's log, each of which must be a JSON event."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name}:{n} is not JSON: {line[:300]!r}")
        assert isinstance(record, dict), f"{path.name}:{n}: {line[:300]!r}"
        missing = {"event", "level", "service", "timestamp"} - set(record)
        assert not missing, f"{path.name}:{n} lacks {missing}: {line[:300]!r}"
        records.append(record)
    return records


def check_request_ids(logs: dict[str, list[dict]]) -> dict[str, set[str]]:
    """Every event naming a request carries valid trace and span ids; {request_id: trace ids}."""
    traces: dict[str, set[str]] = {}
    for label, records in logs.items():
        for r in records:
            if "request_id" not in r:
                continue
            assert TRACE_ID.match(str(r.get("trace_id"))) and int(r["trace_id"], 16), (label, r)
            assert SPAN_ID.match(str(r.get("span_id"))) and int(r["span_id"], 16), (label, r)
            traces.setdefault(r["request_id"], set()).add(r["trace_id"])
    return traces


async def stream(nc, body: dict) -> list[dict]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.GENERATE, json.dumps({**body, "stream": True}).encode(), reply=inbox)
    events = []
    try:
        while not events or (events[-1].get("type") != "done" and "error" not in events[-1]):
            events.append(json.loads((await sub.next_msg(timeout=120)).data))
    finally:
        await sub.unsubscribe()
    return events


async def test_one_json_event_per_request_state_change_with_trace_ids(tmp_path):
    stack = Stack(tmp_path, workers=0, env={"RINGSERVE_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS)})
    try:
        await stack.wait_ready(0, world=False)
        # no worker yet: the request waits for one (heartbeat timeout, 2 s), then is refused
        waited = await stack.generate({"prompt": "anyone there?", "max_new_tokens": 4, "request_id": "log-wait"})
        assert waited["error"]["code"] == "unavailable", waited
        stack.start("worker", "worker0")
        await stack.wait_ready(1)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            # stop_token_ids out of the way: only max_new_tokens ends these two
            long = await stream(nc, {"prompt": "log me a long one", "max_new_tokens": 40, "request_id": "log-long"})
            assert long[-1].get("type") == "done", f"{long[-1]}\n{stack.logs()}"
            short = await stream(nc, {"prompt": "log me a long one", "max_new_tokens": 4, "request_id": "log-short"})
            assert short[-1].get("type") == "done", f"{short[-1]}\n{stack.logs()}"
            failed = await stack.generate({"prompt": "too long " * MAX_PROMPT_TOKENS, "max_new_tokens": 4,
                                           "request_id": "log-fail"})
            assert failed["error"]["code"] == "too_long", failed
        finally:
            await nc.close()
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{stack.logs()}"
    assert len(long[-1]["output_ids"]) > len(short[-1]["output_ids"]), (long[-1], short[-1])
    assert len([e for e in long if e["type"] == "token"]) == len(long[-1]["output_ids"])

    logs = {label: read_log(tmp_path / f"{label}.log") for label in stack.procs}
    assert {r["service"] for records in logs.values() for r in records} >= {"scheduler", "worker", "fusion"}

    traces = check_request_ids(logs)
    assert set(traces) >= {"log-long", "log-short", "log-fail", "log-wait"}, traces
    for request_id, ids in traces.items():
        assert len(ids) == 1, (request_id, ids)  # one trace per request, across services
    assert traces["log-long"] != traces["log-short"]
    # the worker's events join the scheduler's trace
    worker = {r["request_id"]: r["trace_id"] for r in logs["worker0"] if "request_id" in r}
    assert worker["log-long"] in traces["log-long"] and worker["log-short"] in traces["log-short"]

    scheduler = logs["scheduler"]

    def events_of(request_id: str, records: list[dict] = scheduler) -> list[str]:
        return [r["event"] for r in records if r.get("request_id") == request_id]

    for request_id in ("log-long", "log-short"):
        assert [e for e in events_of(request_id) if e in LIFECYCLE] == LIFECYCLE, events_of(request_id)
        done = next(r for r in scheduler if r.get("request_id") == request_id and r["event"] == "request_done")
        assert done["level"] == "info" and done["finish"] == "length"
        assert [e for e in events_of(request_id, logs["worker0"]) if e.startswith("prefill_")] == [
            "prefill_started", "prefill_done"]
    assert events_of("log-fail") == ["request_received", "request_failed"], events_of("log-fail")
    failure = next(r for r in scheduler if r.get("request_id") == "log-fail" and r["event"] == "request_failed")
    assert failure["code"] == "too_long" and failure["level"] == "info"
    assert events_of("log-wait") == ["request_received", "request_waiting", "request_failed"], events_of("log-wait")

    # nothing per token: 4 and 40 tokens leave the same info lines, in every service
    def info_lines(request_id: str) -> Counter:
        return Counter((label, r["event"]) for label, records in logs.items() for r in records
                       if r.get("request_id") == request_id and r["level"] == "info")

    assert info_lines("log-long") == info_lines("log-short"), (info_lines("log-long"), info_lines("log-short"))
    assert sum(info_lines("log-long").values()) < 20


async def test_a_ring_request_and_its_cancel_share_one_trace_in_every_log(tmp_path):
    stack = Stack(tmp_path, workers=2, env={"RINGSERVE_CHUNK_TOKENS": "8"})
    try:
        await stack.wait_ready(2)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            body = {"prompt": "a prompt that spans two workers", "max_new_tokens": 2000, "stream": True,
                    "request_id": "log-ring"}
            await nc.publish(subjects.GENERATE, json.dumps(body).encode(), reply=inbox)
            events = [json.loads((await sub.next_msg(timeout=120)).data)]
            while events[-1].get("type") != "token":
                assert "error" not in events[-1], events[-1]
                events.append(json.loads((await sub.next_msg(timeout=120)).data))
            cancel = json.loads((await nc.request(subjects.CANCEL, b'{"request_id": "log-ring"}', timeout=10)).data)
            assert cancel["cancelled"] is True, cancel
            while events[-1].get("type") != "done":
                assert "error" not in events[-1], events[-1]
                events.append(json.loads((await sub.next_msg(timeout=120)).data))
        finally:
            await nc.close()
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{stack.logs()}"
    assert events[-1]["finish_reason"] == "cancelled" and len(events[-1]["placement"]["workers"]) == 2

    logs = {label: read_log(tmp_path / f"{label}.log") for label in stack.procs}
    traces = check_request_ids(logs)
    assert len(traces["log-ring"]) == 1, traces
    for label in ("worker0", "worker1"):
        mine = [r for r in logs[label] if r.get("request_id") == "log-ring"]
        assert [r["event"] for r in mine if r["event"].startswith("prefill_")] == ["prefill_started", "prefill_done"]
    scheduler = [r for r in logs["scheduler"] if r.get("request_id") == "log-ring"]
    events_seen = [r["event"] for r in scheduler]
    assert "request_cancelled" in events_seen and events_seen[-1] == "request_done", events_seen
    assert scheduler[-1]["finish"] == "cancelled"
    # far fewer lines than decode steps: nothing is logged per token
    tokens = len(events[-1]["output_ids"])
    info = [r for records in logs.values() for r in records if r.get("request_id") == "log-ring" and r["level"] == "info"]
    assert len(info) < 20, (tokens, [r["event"] for r in info])
