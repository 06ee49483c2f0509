"""Preemption under KV memory pressure end to end (issue 13 item 3): one CPU worker whose KV pool
holds fewer tokens than the concurrent requests' decodes come to need. Admission reserves no decode
room (admission_decode_reserve_tokens=0), so all of them are placed at once; as they decode the
pool fills, the request whose step finds no page is preempted and recomputed when room returns.
Every request completes with the tokens it gets alone, greedy or seeded sampled (the resumed run
draws each token's randomness from the seed and the token's position, shared/sampling.py), and
the scheduler logged a preemption."""

import asyncio
import json

import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

BLOCK = 16
CAPACITY = 64  # the worker's KV tokens: 4 pages, and its pool 4 + DECODE_BATCH pages (capacity.py)
DECODE_BATCH = 2
PROMPT_TOKENS = 20
NEW_TOKENS = 40  # 60 KV tokens each: one request fits alone, two or three overflow the 96-row pool
REQUESTS = 3


def _prompt(salt: int) -> list[int]:
    return [(i * 7 + salt * 13) % 100 + 3 for i in range(PROMPT_TOKENS)]


SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}  # plus a seed per request


def _body(salt: int) -> dict:
    return {"input_ids": _prompt(salt), "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "request_id": f"p{salt}"}


def _seeded_body(salt: int) -> dict:
    return {**_body(salt), **SAMPLED, "seed": 1000 + salt, "request_id": f"s{salt}"}


@pytest.fixture(scope="module")
def small_pool_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("preempt"), workers=1, env={
        "RINGSERVE_KV_BLOCK_TOKENS": str(BLOCK), "RINGSERVE_WORKER_MAX_TOKENS": str(CAPACITY),
        "RINGSERVE_DECODE_MAX_BATCH": str(DECODE_BATCH), "RINGSERVE_ADMISSION_DECODE_RESERVE_TOKENS": "0",
        "RINGSERVE_MAX_PREEMPTIONS": "16"})
    try:
        asyncio.run(stack.wait_ready(1))
        yield stack
    finally:
        stack.stop()


def _preemptions(stack) -> list[dict]:
    lines = (stack.workdir / "scheduler.log").read_text().splitlines()
    events = []
    for line in lines:
        if "request_preempted" in line:
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"line": line})
    return events


async def test_requests_whose_decodes_overflow_the_pool_all_complete_with_their_own_tokens(small_pool_stack):
    stack = small_pool_stack
    alone = []
    for salt in range(REQUESTS):  # one at a time: each fits, nothing is preempted
        reply = await stack.generate(_body(salt))
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        assert len(reply["output_ids"]) == NEW_TOKENS
        alone.append(reply["output_ids"])
    assert not _preemptions(stack)

    together = await asyncio.gather(*(stack.generate({**_body(salt), "request_id": f"c{salt}"})
                                      for salt in range(REQUESTS)))
    for salt, reply in enumerate(together):
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        assert reply["request_id"] == f"c{salt}" and reply["finish_reason"] == "length"
        assert reply["output_ids"] == alone[salt], salt  # recomputed: the same greedy tokens
        assert reply["usage"]["prompt_tokens"] == PROMPT_TOKENS
        assert reply["usage"]["completion_tokens"] == NEW_TOKENS
    preempted = _preemptions(stack)
    assert preempted, stack.logs()
    print(f"{len(preempted)} preemptions:", [(e.get("request_id"), e.get("count"), e.get("tokens_so_far")) for e in preempted])


async def test_seeded_sampled_requests_that_are_preempted_continue_their_random_stream(small_pool_stack):
    stack = small_pool_stack
    alone = []
    for salt in range(REQUESTS):
        reply = await stack.generate(_seeded_body(salt))
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        alone.append(reply["output_ids"])
    assert len(set(map(tuple, alone))) == REQUESTS
    # the same seed again: the same tokens (nothing about the worker's state carries over)
    assert (await stack.generate({**_seeded_body(0), "request_id": "s0-again"}))["output_ids"] == alone[0]

    together = await asyncio.gather(*(stack.generate({**_seeded_body(salt), "request_id": f"t{salt}"})
                                      for salt in range(REQUESTS)))
    for salt, reply in enumerate(together):
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        # preempted or not: exactly the tokens of the undisturbed run
        assert reply["output_ids"] == alone[salt], salt
    preempted = [e for e in _preemptions(stack) if str(e.get("request_id", "")).startswith("t")]
    assert preempted and all(e.get("tokens_so_far", 0) > 0 for e in preempted), stack.logs()
    assert all(e.get("sampling") == "seeded" for e in preempted), preempted
    print(f"{len(preempted)} seeded preemptions:", [(e.get("request_id"), e.get("tokens_so_far")) for e in preempted])
