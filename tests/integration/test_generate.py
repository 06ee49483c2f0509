"""The public API end to end: the demo model served by real processes over a real NATS."""

import asyncio
import json
import random

import msgpack
import nats
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("demo"), workers=1,
                  env={"RINGSERVE_MAX_PROMPT_TOKENS": "2000", "RINGSERVE_MAX_REQUEST_BYTES": "65536"})
    try:
        asyncio.run(stack.wait_ready(1))
        yield stack
    finally:
        codes = stack.stop()
        assert all(code == 0 for code in codes.values()), f"unclean exit {codes}\n{stack.logs()}"


async def _request(nc, body, msgpack_body=False, timeout=60):
    if msgpack_body:
        msg = await nc.request("ringserve.v1.generate", msgpack.packb(body), timeout=timeout,
                               headers={"Content-Type": "application/msgpack"})
        return msgpack.unpackb(msg.data)
    msg = await nc.request("ringserve.v1.generate", json.dumps(body).encode(), timeout=timeout)
    return json.loads(msg.data)


async def test_json_and_msgpack_requests_get_the_contract_reply(demo_stack):
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        a = await _request(nc, {"prompt": "Hello, ringserve", "max_new_tokens": 8, "request_id": "json-1"})
        assert "error" not in a, a
        assert a["request_id"] == "json-1" and len(a["output_ids"]) <= 8
        assert a["finish_reason"] in ("length", "stop") and isinstance(a["text"], str)
        assert a["usage"]["completion_tokens"] == len(a["output_ids"]) and a["usage"]["prompt_tokens"] > 0
        assert set(a["timings"]) == {"queue_ms", "ttft_ms", "total_ms"}
        assert a["placement"]["workers"] and a["logprobs"] is None
        b = await _request(nc, {"prompt": "Hello, ringserve", "max_new_tokens": 8, "logprobs": True}, msgpack_body=True)
        assert b["output_ids"] == a["output_ids"]  # greedy is deterministic
        assert len(b["logprobs"]) == len(b["output_ids"]) and all(lp <= 0 for lp in b["logprobs"])
    finally:
        await nc.close()


async def test_concurrent_requests_decode_batched_with_the_same_tokens_as_alone(demo_stack):
    """Requests decoding at once share the worker's decode batches and the fusion messages of a
    step; each must get exactly what it gets alone (greedy and seeded sampling)."""
    bodies = [{"input_ids": list(range(3, 3 + n)), "max_new_tokens": new, "stop_token_ids": []}
              for n, new in ((5, 24), (40, 16), (17, 20))]
    bodies.append({"prompt": "sampled", "max_new_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": 7})
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        alone = [await _request(nc, body) for body in bodies]
        together = await asyncio.gather(*(_request(nc, body) for body in bodies))
    finally:
        await nc.close()
    for a, b in zip(alone, together):
        assert "error" not in a and "error" not in b, (a, b)
        assert b["output_ids"] == a["output_ids"]


async def test_streaming_sends_progress_tokens_then_done(demo_stack):
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("ringserve.v1.generate",
                         json.dumps({"prompt": "stream me " * 20, "max_new_tokens": 6, "stream": True}).encode(),
                         reply=inbox)
        events = []
        while True:
            msg = await sub.next_msg(timeout=60)
            events.append(json.loads(msg.data))
            if events[-1].get("type") == "done" or "error" in events[-1]:
                break
        types = [e["type"] for e in events]
        assert "progress" in types and types[-1] == "done", events
        tokens = [e for e in events if e["type"] == "token"]
        assert [t["token_id"] for t in tokens] == events[-1]["output_ids"]
        assert "".join(t["text"] for t in tokens) == events[-1]["text"]
        progress = [e for e in events if e["type"] == "progress"]
        assert progress[-1]["done_tokens"] == progress[-1]["total_tokens"] == events[-1]["usage"]["prompt_tokens"]
    finally:
        await nc.close()


async def test_cancel_stops_a_running_request_and_status_reports_load(demo_stack):
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        status = json.loads((await nc.request("ringserve.v1.status", b"{}", timeout=5)).data)
        assert status["model"] == "demo" and len(status["workers"]) == 1
        assert {s["service"] for s in status["services"]} >= {"scheduler", "fusion"}, status["services"]
        for service in ("scheduler", "worker", "fusion"):  # discoverable through the NATS services API
            ping = json.loads((await nc.request(f"$SRV.PING.ringserve-{service}", b"", timeout=5)).data)
            assert ping["name"] == f"ringserve-{service}" and ping["type"] == "io.nats.micro.v1.ping_response"
        task = asyncio.create_task(_request(nc, {"prompt": "x", "max_new_tokens": 2000, "request_id": "long-1"}))
        await asyncio.sleep(1.0)
        cancel = json.loads((await nc.request("ringserve.v1.cancel", b'{"request_id": "long-1"}', timeout=5)).data)
        assert cancel == {"request_id": "long-1", "cancelled": True}
        reply = await task
        assert reply["finish_reason"] == "cancelled" and 0 < len(reply["output_ids"]) < 2000
        unknown = json.loads((await nc.request("ringserve.v1.cancel", b'{"request_id": "nope"}', timeout=5)).data)
        assert unknown["cancelled"] is False
    finally:
        await nc.close()


async def test_stop_strings_and_stop_token_ids(demo_stack):
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        base = await _request(nc, {"prompt": "abc", "max_new_tokens": 12})
        ids = base["output_ids"]
        cut = await _request(nc, {"prompt": "abc", "max_new_tokens": 12, "stop_token_ids": [ids[3]]})
        first = ids.index(ids[3])
        assert cut["finish_reason"] == "stop" and cut["output_ids"] == ids[: first + 1]
        text = base["text"]
        if len(text) >= 4:
            stop = text[2:4]
            s = await _request(nc, {"prompt": "abc", "max_new_tokens": 12, "stop": [stop]})
            assert s["finish_reason"] == "stop" and s["text"] == text[: text.index(stop)]
    finally:
        await nc.close()


async def test_ignore_eos_runs_past_the_models_end_of_sequence(demo_stack):
    # The demo model's greedy answer to these ids ("<s>p45") ends with EOS after 7 tokens.
    body = {"input_ids": [256, 112, 52, 53], "max_new_tokens": 20}
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        ended = await _request(nc, body)
        assert ended["finish_reason"] == "stop" and len(ended["output_ids"]) < 20, ended
        past = await _request(nc, {**body, "ignore_eos": True})
        assert past["finish_reason"] == "length" and len(past["output_ids"]) == 20, past
        assert past["output_ids"][: len(ended["output_ids"])] == ended["output_ids"]
        eos = ended["output_ids"][-1]
        # an explicit stop id still ends it
        cut = await _request(nc, {**body, "ignore_eos": True, "stop_token_ids": [eos]})
        assert cut["output_ids"] == ended["output_ids"] and cut["finish_reason"] == "stop"
    finally:
        await nc.close()


async def test_two_requests_sent_at_once_under_one_id_are_both_answered(demo_stack):
    # the second is refused before either is placed: sharing the id's token queue lost it (no reply)
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        body = {"input_ids": [5, 6, 7], "max_new_tokens": 2, "request_id": "same-id"}
        replies = await asyncio.gather(_request(nc, body, timeout=30), _request(nc, body, timeout=30))
        codes = sorted(r["error"]["code"] if "error" in r else "done" for r in replies)
        assert codes == ["done", "invalid_request"], replies
    finally:
        await nc.close()


def _decode(msg):
    """Replies use the request's encoding and say which in Content-Type."""
    if msg.headers["Content-Type"] == "application/json":
        return json.loads(msg.data)
    return msgpack.unpackb(msg.data)


BAD_BODIES = [
    (b"\x00\x01garbage", "invalid_request"),
    (b"{", "invalid_request"),
    (json.dumps({"prompt": "a", "input_ids": [1]}).encode(), "invalid_request"),
    (json.dumps({}).encode(), "invalid_request"),
    (json.dumps({"prompt": 3}).encode(), "invalid_request"),
    (json.dumps({"prompt": "a", "max_new_tokens": -4}).encode(), "invalid_request"),
    (json.dumps({"prompt": "a", "max_new_tokens": 10**9}).encode(), "invalid_request"),
    (json.dumps({"input_ids": [1, 10**6]}).encode(), "invalid_request"),
    (json.dumps({"input_ids": [5] * 2001}).encode(), "too_long"),
    (json.dumps({"prompt": "a" * 70000}).encode(), "invalid_request"),
]


async def test_bad_input_gets_coded_errors_and_loses_nothing(demo_stack):
    nc = await nats.connect(demo_stack.servers.nats_url)
    try:
        good = asyncio.create_task(_request(nc, {"prompt": "survivor", "max_new_tokens": 24}))
        for body, code in BAD_BODIES:
            reply = _decode(await nc.request("ringserve.v1.generate", body, timeout=10))
            assert reply["error"]["code"] == code, (body[:60], reply)
        # bounded fuzz: random bytes, random JSON values, random field mutations
        rng = random.Random(1234)
        fields = ["prompt", "input_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                  "stop_token_ids", "stream", "logprobs", "request_id", "kv_quant", "bogus"]
        values = [None, -1, 0, 1, 2**40, 1.5, "x", "", [], [1, -1], [2**31], {"a": 1}, True, "\udcff"[:0]]
        for i in range(90):
            kind = i % 3
            if kind == 0:
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            elif kind == 1:
                body = json.dumps({rng.choice(fields): rng.choice(values) for _ in range(rng.randrange(1, 4))}).encode()
            else:
                body = msgpack.packb({rng.choice(fields): rng.choice(values) for _ in range(rng.randrange(1, 4))})
            msg = await nc.request("ringserve.v1.generate", body, timeout=30)
            reply = _decode(msg)
            # a valid streaming request answers first with an event
            assert "error" in reply or "output_ids" in reply or reply.get("type") in ("progress", "token"), reply
            if "error" in reply:
                assert reply["error"]["code"] in {"invalid_request", "too_long", "unsupported"}, reply
        result = await good
        assert "output_ids" in result and result["usage"]["completion_tokens"] > 0
        ok = await _request(nc, {"prompt": "still alive", "max_new_tokens": 2})
        assert len(ok["output_ids"]) >= 1
    finally:
        await nc.close()
