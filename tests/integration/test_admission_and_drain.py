"""Admission under load and SIGTERM drains: past the active-request limit a request is refused
with `overloaded` and the running ones go on; a stack told to stop (as `docker compose down` or
a Ctrl-C does) finishes the request in flight, takes no new one, and exits cleanly; a drain that
runs out of time still answers the request it cuts off."""

from __future__ import annotations

import asyncio
import json
import signal

import nats
import pytest

from shared import codec, subjects
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

NEW_TOKENS = 48
LONG_TOKENS = 1000


async def _stream_until_first_token(nc, body: dict) -> tuple[asyncio.Queue, object]:
    events: asyncio.Queue = asyncio.Queue()
    inbox = nc.new_inbox()

    async def on_event(msg) -> None:
        await events.put(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=on_event)
    await nc.publish(subjects.GENERATE, json.dumps({**body, "stream": True}).encode(), reply=inbox)
    while True:
        event = await asyncio.wait_for(events.get(), 60)
        assert "error" not in event, event
        if event.get("type") == "token":
            return events, sub


async def _wait_for_draining_scheduler(nc) -> None:
    seen = asyncio.Event()

    async def on_beat(msg) -> None:
        if codec.unpack(msg.data).get("draining"):
            seen.set()

    sub = await nc.subscribe(f"{subjects.HEARTBEAT}.scheduler.>", cb=on_beat)
    try:
        await asyncio.wait_for(seen.wait(), 10)
    finally:
        await sub.unsubscribe()


async def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_cleanly(tmp_path):
    stack = Stack(tmp_path, workers=1)
    try:
        await stack.wait_ready(1)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            events, sub = await _stream_until_first_token(nc, {"prompt": "drain me", "max_new_tokens": NEW_TOKENS})
            for proc in stack.procs.values():
                proc.send_signal(signal.SIGTERM)
            # While draining, the scheduler no longer takes requests: nobody answers a new one.
            await asyncio.sleep(0.3)
            with pytest.raises(nats.errors.NoRespondersError):
                await nc.request(subjects.GENERATE, json.dumps({"prompt": "late"}).encode(), timeout=5)
            while (event := await asyncio.wait_for(events.get(), 60)).get("type") != "done":
                assert "error" not in event, event
            await sub.unsubscribe()
        finally:
            await nc.close()
        assert event["finish_reason"] == "length" and len(event["output_ids"]) == NEW_TOKENS
        codes = {label: proc.wait(30) for label, proc in stack.procs.items()}
        assert codes == {label: 0 for label in stack.procs}, stack.logs()
    finally:
        stack.stop()


async def test_a_drain_out_of_time_answers_unavailable_and_releases_the_workers(tmp_path):
    # long enough, past the budget's margins, for the cut-off request's reply on a loaded machine
    stack = Stack(tmp_path, workers=1, env={"RINGSERVE_DRAIN_TIMEOUT_S": "3.0"})
    try:
        await stack.wait_ready(1)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            events, sub = await _stream_until_first_token(nc, {"prompt": "long one", "max_new_tokens": 4000,
                                                                 "ignore_eos": True})
            stack.killed.add("scheduler")
            stack.procs["scheduler"].send_signal(signal.SIGTERM)
            await _wait_for_draining_scheduler(nc)
            while "error" not in (event := await asyncio.wait_for(events.get(), 30)):
                assert event.get("type") == "token", event
            await sub.unsubscribe()
            assert event["error"]["code"] == "unavailable", event
            assert stack.procs["scheduler"].wait(15) == 0, stack.logs()
            # The cut-off request's KV was released on the worker: a new scheduler sees it idle.
            stack.start("scheduler", "scheduler2")
            status = await stack.wait_ready(1)
            for _ in range(50):
                if status["workers"][0]["active_requests"] == 0:
                    break
                await asyncio.sleep(0.1)
                status = await stack.status(nc)
            assert status["workers"][0]["active_requests"] == 0, status
        finally:
            await nc.close()
    finally:
        stack.stop()


async def test_requests_over_the_active_limit_are_overloaded_and_the_running_one_goes_on(tmp_path):
    stack = Stack(tmp_path, workers=1, env={"RINGSERVE_MAX_ACTIVE_REQUESTS": "1"})
    try:
        await stack.wait_ready(1)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            # long enough to be running still when the second request arrives, however fast decode is
            events, sub = await _stream_until_first_token(nc, {"prompt": "first", "max_new_tokens": LONG_TOKENS})
            refused = json.loads((await nc.request(subjects.GENERATE, b'{"prompt": "second"}', timeout=30)).data)
            assert refused["error"]["code"] == "overloaded", refused
            while (event := await asyncio.wait_for(events.get(), 60)).get("type") != "done":
                assert "error" not in event, event
            await sub.unsubscribe()
            assert event["finish_reason"] in ("length", "stop") and event["output_ids"], event  # the demo may hit eos
            # The slot is free again.
            reply = json.loads((await nc.request(subjects.GENERATE, b'{"prompt": "third", "max_new_tokens": 2}',
                                                 timeout=30)).data)
            assert len(reply["output_ids"]) == 2, reply
        finally:
            await nc.close()
    finally:
        stack.stop()


async def test_kv_capacity_spreads_a_prompt_over_a_ring_and_refuses_what_no_ring_holds(tmp_path):
    # 40 KV tokens per worker: a 60-token prompt (one 8K policy chunk) + 10 new tokens needs two.
    stack = Stack(tmp_path, workers=2, env={"RINGSERVE_WORKER_MAX_TOKENS": "40"})
    try:
        status = await stack.wait_ready(2)
        assert [w["kv_capacity_tokens"] for w in status["workers"]] == [40, 40]
        reply = await stack.generate({"input_ids": list(range(1, 61)), "max_new_tokens": 10})
        assert len(reply["output_ids"]) == 10, reply
        assert len(reply["placement"]["workers"]) == 2, reply
        refused = await stack.generate({"input_ids": list(range(1, 61)), "max_new_tokens": 21})
        assert refused["error"]["code"] == "too_long" and "capacity" in refused["error"]["message"], refused
        # Both workers full (30 + 50 = 40 each): another request waits in the queue, and a
        # cancel ends the wait at once, with nothing placed.
        nc = await nats.connect(stack.servers.nats_url)
        try:
            events, sub = await _stream_until_first_token(nc, {"input_ids": list(range(1, 31)), "max_new_tokens": 50})
            waiting = asyncio.create_task(stack.generate({"input_ids": [5, 6, 7], "max_new_tokens": 4,
                                                          "request_id": "queued-1"}))
            for _ in range(100):
                if (await stack.status(nc))["queued_requests"] == 1:
                    break
                await asyncio.sleep(0.05)
            cancel = json.loads((await nc.request(subjects.CANCEL, b'{"request_id": "queued-1"}', timeout=10)).data)
            assert cancel["cancelled"] is True
            queued = await asyncio.wait_for(waiting, 10)
            assert queued["finish_reason"] == "cancelled" and queued["placement"] is None, queued
            assert queued["output_ids"] == []
            while (event := await asyncio.wait_for(events.get(), 60)).get("type") != "done":
                assert "error" not in event, event
            await sub.unsubscribe()
            assert len(event["output_ids"]) == 50
        finally:
            await nc.close()
    finally:
        stack.stop()


async def test_without_a_fusion_service_one_worker_requests_run_and_a_ring_is_unavailable_at_once(tmp_path):
    # No fusion process at all; 40 KV tokens per worker, so 60 + 10 tokens need a ring of two.
    stack = Stack(tmp_path, workers=2, services=("scheduler",), env={"RINGSERVE_WORKER_MAX_TOKENS": "40"})
    try:
        await stack.wait_ready(2)
        reply = await stack.generate({"input_ids": [5, 6, 7], "max_new_tokens": 6})
        assert len(reply.get("output_ids", [])) == 6 and len(reply["placement"]["workers"]) == 1, reply
        refused = await asyncio.wait_for(stack.generate({"input_ids": list(range(1, 61)), "max_new_tokens": 10}), 5)
        assert refused["error"]["code"] == "unavailable" and "fusion" in refused["error"]["message"], refused
    finally:
        stack.stop()


async def test_a_worker_ends_the_requests_of_a_scheduler_that_died_and_tells_the_client(tmp_path):
    stack = Stack(tmp_path, workers=1, env={"RINGSERVE_HEARTBEAT_INTERVAL_S": "0.25",
                                            "RINGSERVE_HEARTBEAT_TIMEOUT_S": "1.0"})
    try:
        await stack.wait_ready(1)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            events_in, _ = await _stream_until_first_token(nc, {"prompt": "orphan me", "max_new_tokens": 4000,
                                                               "request_id": "orphan-1"})
            stack.killed.add("scheduler")
            stack.procs["scheduler"].kill()  # SIGKILL: no drain, no release
            # the client is told, on its own reply subject, within a few seconds
            while "error" not in (event := await asyncio.wait_for(events_in.get(), 10)):
                assert event.get("type") in ("token", "progress"), event
            assert event["error"]["code"] == "unavailable" and event["error"]["request_id"] == "orphan-1", event
            worker_log = tmp_path / "worker0.log"
            for _ in range(100):
                events = [json.loads(line) for line in worker_log.read_text().splitlines() if line.startswith("{")]
                mine = [e["event"] for e in events if e.get("request_id") == "orphan-1"]
                if "request_released" in mine:
                    break
                await asyncio.sleep(0.1)
            assert "request_orphaned" in mine and "request_released" in mine, f"{mine}\n{stack.logs()}"
        finally:
            await nc.close()
    finally:
        stack.stop()
