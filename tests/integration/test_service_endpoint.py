"""shared/service.py's typed endpoint (`serve`) against a real nats-server: every service's
subjects go through it, so its four outcomes are pinned here: a reply, a coded reply to a
message that does not decode, a coded reply when the handler fails, and a subscription that
outlives a handler's exception when there is no reply to give."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from shared import codec
from shared.bus import Bus, connect
from shared.errors import MAX_ERROR_CHARS
from shared.messages import AbortCommand, ReleaseCommand
from shared.service import serve
from shared.settings import Settings

pytestmark = pytest.mark.integration
SUBJECT = "test.endpoint"


async def test_a_typed_endpoint_replies_and_survives_bad_messages_and_failing_handlers(servers):
    bus = Bus(await connect(Settings(nats_url=servers.nats_url), name="endpoint-test"), "test")
    seen: list[str] = []

    async def handler(cmd: AbortCommand, msg: Msg) -> ReleaseCommand | None:
        seen.append(cmd.request_id)
        if cmd.request_id == "boom":
            raise RuntimeError("handler bug")
        if cmd.request_id == "silent":
            return None
        return ReleaseCommand(request_id=cmd.request_id.upper())

    async def ask(data: bytes) -> Msg:
        return await bus.nc.request(SUBJECT, data, timeout=5)

    try:
        sub = await serve(bus, SUBJECT, AbortCommand, handler,
                          invalid=lambda text: ReleaseCommand(request_id=f"invalid: {text}"),
                          failed=lambda exc: ReleaseCommand(request_id=f"failed: {type(exc).__name__}"))
        ok = codec.decode((await ask(codec.encode(AbortCommand(request_id="abc")))).data, ReleaseCommand)
        assert ok.request_id == "ABC"
        bad = codec.decode((await ask(b"\x00garbage" * 100_000)).data, ReleaseCommand)
        assert bad.request_id.startswith("invalid: ") and len(bad.request_id) <= len("invalid: ") + MAX_ERROR_CHARS
        wrong = codec.decode((await ask(codec.pack({"request_id": 5}))).data, ReleaseCommand)
        assert "invalid AbortCommand" in wrong.request_id
        failed = codec.decode((await ask(codec.encode(AbortCommand(request_id="boom")))).data, ReleaseCommand)
        assert failed.request_id == "failed: RuntimeError"
        again = codec.decode((await ask(codec.encode(AbortCommand(request_id="xyz")))).data, ReleaseCommand)
        assert again.request_id == "XYZ"
        await bus.unsubscribe(sub)

        # No reply builders: a failing handler is logged, the sender times out, the next one is served.
        await serve(bus, SUBJECT, AbortCommand, handler)
        await bus.publish(SUBJECT, AbortCommand(request_id="boom"))
        await bus.publish_raw(SUBJECT, b"not msgpack")
        after = codec.decode((await ask(codec.encode(AbortCommand(request_id="late")))).data, ReleaseCommand)
        assert after.request_id == "LATE" and seen[-2:] == ["boom", "late"]
    finally:
        await bus.drain()
