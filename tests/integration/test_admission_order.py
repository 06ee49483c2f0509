"""The scheduler's wait queue through the real stack: with one worker full, a short prompt that
arrives after a long one is placed first, `ringserve status` shows both places, and the long one
is placed once there is room for it (its `request_dequeued` event says it was overtaken)."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from shared import subjects
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

CAPACITY = 400  # KV tokens of the worker
HOLDER = {"input_ids": list(range(1, 31)), "max_new_tokens": 360, "request_id": "holder"}  # 390 held
LONG = {"input_ids": [7] * 200, "max_new_tokens": 100, "request_id": "long"}  # 300: never beside the holder
SHORT = {"input_ids": [5, 6, 7, 8, 9], "max_new_tokens": 120, "request_id": "short"}  # 125: nor beside the long one


async def _queue(stack: Stack, nc, want: list[str]) -> list[dict]:
    for _ in range(200):
        queue = (await stack.status(nc))["queue"]
        if [q["request_id"] for q in queue] == want:
            return queue
        await asyncio.sleep(0.05)
    raise AssertionError(f"queue {queue}, wanted {want}\n{stack.logs()}")


async def test_a_short_prompt_goes_before_a_long_one_and_the_long_one_follows(tmp_path):
    # Aging this slow leaves the order shortest first for the whole test.
    stack = Stack(tmp_path, workers=1, env={"RINGSERVE_WORKER_MAX_TOKENS": str(CAPACITY),
                                            "RINGSERVE_ADMISSION_AGING_TOKENS_PER_S": "0.001"})
    try:
        await stack.wait_ready(1)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            holder = await nc.request(subjects.GENERATE, json.dumps({**HOLDER, "stream": True}).encode(), timeout=60)
            assert "error" not in json.loads(holder.data), holder.data  # the first event: it is placed
            done: list[str] = []

            async def run(body: dict) -> dict:
                reply = await stack.generate(body)
                done.append(body["request_id"])
                return reply

            long = asyncio.create_task(run(LONG))
            await _queue(stack, nc, ["long"])
            short = asyncio.create_task(run(SHORT))
            queue = await _queue(stack, nc, ["short", "long"])
            assert [(q["place"], q["prefill_tokens"]) for q in queue] == [(1, 5), (2, 200)]
            await nc.request(subjects.CANCEL, b'{"request_id": "holder"}', timeout=10)
            short_reply, long_reply = await asyncio.wait_for(asyncio.gather(short, long), 60)
        finally:
            await nc.close()
        assert short_reply["output_ids"] and long_reply["output_ids"], (short_reply, long_reply)
        assert done == ["short", "long"]  # 125 + 300 tokens do not fit together: the long one waited
        events = [json.loads(line) for line in (tmp_path / "scheduler.log").read_text().splitlines()
                  if line.startswith("{")]
        dequeued = [(e["request_id"], e["overtaken_by"]) for e in events if e["event"] == "request_dequeued"]
        assert dequeued == [("short", 0), ("long", 1)], dequeued
    finally:
        stack.stop()
