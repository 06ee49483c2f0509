"""Several requests at once on disjoint rings, collective fusion, and a worker killed mid-request
(its request recovered on the survivors: services/scheduler/recovery.py)."""

import asyncio
import json

import nats
import pytest

from tests.integration.stack import Stack
from tests.integration.test_ring_equivalence import CHUNK, NEW_TOKENS, hf_greedy, tiny_llama  # noqa: F401

pytestmark = pytest.mark.integration


def _ids(n, salt=0):
    return [(i * 37 + 11 + salt) % 297 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def collective_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    path, _ = tiny_llama
    stack = Stack(tmp_path_factory.mktemp("collective"), workers=4,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK),
                       "RINGSERVE_FUSION": "collective", "RINGSERVE_MAX_RING_SIZE": "2"})
    try:
        asyncio.run(stack.wait_ready(4))
        yield stack
    finally:
        stack.stop()


async def test_collective_fusion_on_two_disjoint_rings_at_once(collective_stack, tiny_llama):  # noqa: F811
    _, model = tiny_llama
    prompts = [_ids(30, salt) for salt in (0, 5)]
    replies = await asyncio.gather(*(collective_stack.generate({"input_ids": p, "max_new_tokens": NEW_TOKENS}) for p in prompts))
    rings = []
    for prompt, reply in zip(prompts, replies):
        assert "error" not in reply, f"{reply}\n{collective_stack.logs()}"
        expected = hf_greedy(model, prompt)
        assert reply["output_ids"] == expected[: len(reply["output_ids"])]
        rings.append(set(reply["placement"]["workers"]))
        assert len(rings[-1]) == 2
    assert not rings[0] & rings[1], "two rings running at once must not share a worker"


async def test_killed_worker_s_request_is_recovered_and_the_next_one_succeeds(tmp_path_factory, tiny_llama):  # noqa: F811
    path, model = tiny_llama
    stack = Stack(tmp_path_factory.mktemp("faults"), workers=3,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK),
                       "RINGSERVE_FUSION_TIMEOUT_S": "8", "RINGSERVE_DIST_TIMEOUT_S": "8"})
    try:
        await stack.wait_ready(3)
        nc = await nats.connect(stack.servers.nats_url)
        try:
            # Streamed, so the kill lands mid-decode however fast decode runs on this machine.
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            body = {"input_ids": _ids(40), "max_new_tokens": 400}
            await nc.publish("ringserve.v1.generate", json.dumps({**body, "stream": True}).encode(), reply=inbox)
            while (event := json.loads((await sub.next_msg(timeout=60)).data)).get("type") != "token":
                assert "error" not in event, event
            streamed = [event["token_id"]]
            stack.kill("worker1")  # SIGKILL: no goodbye; it holds part of the ring's KV
            while "error" not in event and event.get("type") != "done":
                event = json.loads((await sub.next_msg(timeout=60)).data)
                if event.get("type") == "token":
                    streamed.append(event["token_id"])
        finally:
            await nc.close()
        # Recovered (re-run from the prompt and the tokens so far): the greedy tokens of an
        # undisturbed run, each streamed once.
        assert event.get("type") == "done", f"{event}\n{stack.logs()}"
        assert streamed == event["output_ids"] and len(streamed) == body["max_new_tokens"]
        assert event["usage"]["prompt_tokens"] == len(body["input_ids"])
        await stack.wait_ready(2, timeout=60)
        undisturbed = await stack.generate(body)
        assert undisturbed["output_ids"] == event["output_ids"]
        assert event["output_ids"][:NEW_TOKENS] == hf_greedy(model, body["input_ids"])
        prompt = _ids(25, 3)
        reply = await stack.generate({"input_ids": prompt, "max_new_tokens": NEW_TOKENS})
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        assert len(reply["placement"]["workers"]) == 2 and "worker1" not in reply["placement"]["workers"]
        assert reply["output_ids"] == hf_greedy(model, prompt)[: len(reply["output_ids"])]
    finally:
        stack.stop()
