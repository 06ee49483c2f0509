"""RingserveClient against a real nats-server (private, on a free port) and a small scheduler
stand-in that speaks the public protocol: JSON or msgpack, streams, errors, no responders."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from shared import codec, subjects
from shared.client import (
    RingserveClient,
    RingserveError,
    as_request,
    decode_body,
    parse_event,
)
from shared.messages import (
    CancelReply,
    DoneEvent,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    GenerateReply,
    Placement,
    ProgressEvent,
    StatusReply,
    Timings,
    TokenEvent,
    Usage,
    WorkerStatus,
)
from shared.settings import Settings
from services.cli.stack import find_binary, nats_command, port_open

ANSWER = ["Hel", "lo", "!"]
PROMPT_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        assert proc.poll() is None, "server exited at start"
        assert time.monotonic() < deadline, "server did not open its port"
        time.sleep(0.05)


@pytest.fixture
def private_nats(tmp_path) -> Iterator[str]:
    """A nats-server of this test only: the public subjects on the shared one belong to others."""
    binary = find_binary("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed")
    port = free_port()
    proc = subprocess.Popen(nats_command(binary, "127.0.0.1", port, tmp_path / "js"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def reply_for(request_id: str, text: str) -> GenerateReply:
    return GenerateReply(
        request_id=request_id, output_ids=list(range(len(ANSWER))), text=text, finish_reason="length",
        usage=Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=len(ANSWER)),
        timings=Timings(queue_ms=1.0, ttft_ms=20.0, total_ms=60.0),
        placement=Placement(workers=["w-1"], chunk_tokens=PROMPT_TOKENS, chunks=1),
    )


class FakeScheduler:
    """Answers the public subjects as the contract says; prompt "fail" gets an error reply and
    prompt "silent" no reply at all."""

    def __init__(self, nc):
        self.nc = nc
        self.content_types: list[str] = []

    async def start(self) -> None:
        await self.nc.subscribe(subjects.GENERATE, cb=self.on_generate)
        await self.nc.subscribe(subjects.STATUS, cb=self.on_status)
        await self.nc.subscribe(subjects.CANCEL, cb=self.on_cancel)

    async def send(self, subject: str, message, content_type: str) -> None:
        await self.nc.publish(subject, codec.dump_public(message, content_type), headers={"Content-Type": content_type})

    async def on_generate(self, msg) -> None:
        content_type = codec.public_content_type(msg.data, (msg.headers or {}).get("Content-Type"))
        self.content_types.append(content_type)
        body = codec.load_public(msg.data, content_type)
        request_id = body.get("request_id") or "req-fake"
        if body["prompt"] == "silent":
            return
        if body["prompt"] == "fail":
            error = ErrorReply(error=ErrorBody(code=ErrorCode.TOO_LONG, message="too long", request_id=request_id))
            await self.send(msg.reply, error, content_type)
            return
        reply = reply_for(request_id, "".join(ANSWER))
        if not body.get("stream"):
            await self.send(msg.reply, reply, content_type)
            return
        for done in (0, PROMPT_TOKENS // 2, PROMPT_TOKENS):
            await self.send(msg.reply, ProgressEvent(request_id=request_id, done_tokens=done,
                                                     total_tokens=PROMPT_TOKENS), content_type)
        for index, piece in enumerate(ANSWER):
            await self.send(msg.reply, TokenEvent(request_id=request_id, index=index, token_id=index, text=piece),
                            content_type)
        await self.send(msg.reply, DoneEvent(**reply.model_dump()), content_type)

    async def on_status(self, msg) -> None:
        workers = [WorkerStatus(worker_id=f"w-{i}", device="cpu", busy=False, active_requests=0, kv_tokens=0,
                                last_seen_s=0.1) for i in range(2)]
        status = StatusReply(model="demo", workers=workers, queued_requests=0, active_requests=0, world_generation=3)
        await self.send(msg.reply, status, codec.public_content_type(msg.data, (msg.headers or {}).get("Content-Type")))

    async def on_cancel(self, msg) -> None:
        content_type = codec.public_content_type(msg.data, (msg.headers or {}).get("Content-Type"))
        body = codec.load_public(msg.data, content_type)
        await self.send(msg.reply, CancelReply(request_id=body["request_id"], cancelled=True), content_type)


@pytest.fixture
async def scheduler(private_nats):
    import nats

    nc = await nats.connect(private_nats)
    fake = FakeScheduler(nc)
    await fake.start()
    yield fake
    await nc.drain()


# ---- pure helpers ------------------------------------------------------------------------------


def test_decode_body_raises_the_error_reply():
    data = b'{"error": {"code": "overloaded", "message": "busy", "request_id": "r1"}}'
    with pytest.raises(RingserveError) as info:
        decode_body(data, None)
    assert (info.value.code, info.value.message, info.value.request_id) == ("overloaded", "busy", "r1")


def test_decode_body_reads_msgpack_and_rejects_garbage():
    assert decode_body(codec.dump_public({"a": 1}, codec.MSGPACK), codec.MSGPACK) == {"a": 1}
    with pytest.raises(RingserveError) as info:
        decode_body(b"{not json", None)
    assert info.value.code == "internal"


def test_parse_event_picks_the_model_by_type():
    assert isinstance(parse_event({"type": "progress", "request_id": "r", "done_tokens": 1, "total_tokens": 2}),
                      ProgressEvent)
    assert parse_event({"type": "token", "request_id": "r", "index": 0, "token_id": 7}).token_id == 7
    with pytest.raises(RingserveError):
        parse_event({"type": "mystery"})


def test_as_request_validates_locally_and_sets_stream():
    assert as_request({"prompt": "hi"}, stream=True).stream is True
    assert as_request({"prompt": "hi", "stream": True}, stream=False).stream is False
    with pytest.raises(RingserveError) as info:
        as_request({"prompt": "hi", "input_ids": [1]}, stream=False)
    assert info.value.code == "invalid_request"


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError):
        RingserveClient(nc=None, encoding="xml")  # type: ignore[arg-type]


# ---- against NATS ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_generate_in_both_encodings(private_nats, scheduler, encoding):
    async with await RingserveClient.connect(Settings(nats_url=private_nats), encoding=encoding) as client:
        reply = await client.generate({"prompt": "hi", "request_id": "r-1"}, timeout=5)
    assert reply.request_id == "r-1" and reply.text == "".join(ANSWER)
    assert scheduler.content_types == [codec.JSON if encoding == "json" else codec.MSGPACK]


async def test_generate_error_reply_raises(private_nats, scheduler):
    async with await RingserveClient.connect(Settings(nats_url=private_nats)) as client:
        with pytest.raises(RingserveError) as info:
            await client.generate({"prompt": "fail", "request_id": "r-2"}, timeout=5)
    assert (info.value.code, info.value.request_id) == ("too_long", "r-2")


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_stream_yields_progress_tokens_then_done(private_nats, scheduler, encoding):
    async with await RingserveClient.connect(Settings(nats_url=private_nats), encoding=encoding) as client:
        events = [e async for e in client.stream({"prompt": "hi"}, timeout=5)]
    kinds = [e.type for e in events]
    assert kinds == ["progress"] * 3 + ["token"] * len(ANSWER) + ["done"]
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ANSWER
    assert events[-1].usage.completion_tokens == len(ANSWER)


async def test_stream_error_and_idle_timeout(private_nats, scheduler):
    async with await RingserveClient.connect(Settings(nats_url=private_nats)) as client:
        with pytest.raises(RingserveError) as info:
            [e async for e in client.stream({"prompt": "fail"}, timeout=5)]
        assert info.value.code == "too_long"
        with pytest.raises(RingserveError) as info:
            [e async for e in client.stream({"prompt": "silent"}, timeout=0.3)]
        assert info.value.code == "timeout"


async def test_status_and_cancel(private_nats, scheduler):
    async with await RingserveClient.connect(Settings(nats_url=private_nats)) as client:
        status = await client.status()
        cancelled = await client.cancel("r-9")
    assert [w.worker_id for w in status.workers] == ["w-0", "w-1"] and status.world_generation == 3
    assert cancelled.request_id == "r-9" and cancelled.cancelled


async def test_no_scheduler_is_unavailable(private_nats):
    async with await RingserveClient.connect(Settings(nats_url=private_nats)) as client:
        with pytest.raises(RingserveError) as info:
            await client.status()
        assert info.value.code == "unavailable"
        with pytest.raises(RingserveError) as info:
            [e async for e in client.stream({"prompt": "hi"}, timeout=5)]
        assert info.value.code == "unavailable"


async def test_unreachable_nats_fails_fast():
    started = time.monotonic()
    with pytest.raises(RingserveError) as info:
        await RingserveClient.connect(Settings(nats_url=f"nats://127.0.0.1:{free_port()}"))
    assert info.value.code == "unavailable"
    assert time.monotonic() - started < 10
