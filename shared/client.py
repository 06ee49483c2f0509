"""The bundled Python client of the public API (`ringserve.v1.*`).

    client = await RingserveClient.connect(Settings())
    reply = await client.generate({"prompt": "Hello", "max_new_tokens": 16})
    async for event in client.stream({"prompt": "Hello"}):
        ...  # ProgressEvent during prefill, TokenEvent per token, DoneEvent last

Any NATS client can speak the same protocol; this one only adds typing and error handling.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from shared import codec, subjects
from shared.bus import nats_auth_options
from shared.messages import (
    CancelReply,
    CancelRequest,
    DoneEvent,
    ErrorCode,
    GenerateReply,
    GenerateRequest,
    ProgressEvent,
    StatusReply,
    TokenEvent,
)
from shared.settings import Settings

Encoding = Literal["json", "msgpack"]
Event = ProgressEvent | TokenEvent | DoneEvent

CONTENT_TYPES: dict[str, str] = {"json": codec.JSON, "msgpack": codec.MSGPACK}
# Used when the client is built on an existing connection without a timeout.
DEFAULT_TIMEOUT_S = 600.0
# status and cancel are answered by the scheduler at once: a short wait is enough.
CONTROL_TIMEOUT_S = 5.0
# A command-line client should fail fast when NATS is down, unlike services, which wait for it.
CONNECT_TIMEOUT_S = 2.0
CONNECT_ATTEMPTS = 1
RECONNECT_WAIT_S = 0.5
CONNECT_BOUND_S = (CONNECT_ATTEMPTS + 1) * (CONNECT_TIMEOUT_S + RECONNECT_WAIT_S)
# The NATS server answers a request nobody subscribes to with this status header.
NO_RESPONDERS_STATUS = "503"

_EVENT_MODELS: dict[str, type[BaseModel]] = {"progress": ProgressEvent, "token": TokenEvent, "done": DoneEvent}


class RingserveError(Exception):
    """An error reply of the service, or a client-side failure with the same codes."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


# ---- pure helpers: bytes <-> typed messages ----------------------------------------------------


def decode_body(data: bytes, content_type_header: str | None) -> dict[str, Any]:
    """A public reply body as a dict; an `{"error": ...}` body raises RingserveError."""
    try:
        body = codec.load_public(data, codec.public_content_type(data, content_type_header))
    except codec.CodecError as exc:
        raise RingserveError(ErrorCode.INTERNAL.value, f"unreadable reply: {exc}") from None
    if not isinstance(body, dict):
        raise RingserveError(ErrorCode.INTERNAL.value, f"reply is not an object: {body!r}"[:200])
    error = body.get("error")
    if isinstance(error, dict):
        raise RingserveError(str(error.get("code", ErrorCode.INTERNAL.value)), str(error.get("message", "")),
                             error.get("request_id"))
    return body


def parse_event(body: dict[str, Any]) -> Event:
    """One message of a stream, by its `type` field."""
    model = _EVENT_MODELS.get(body.get("type", ""))
    if model is None:
        raise RingserveError(ErrorCode.INTERNAL.value, f"unknown stream message type {body.get('type')!r}")
    return model.model_validate(body)


def as_request(request: GenerateRequest | dict[str, Any], stream: bool) -> GenerateRequest:
    """Validate locally (a bad request fails before touching the bus) and set `stream`."""
    try:
        req = request if isinstance(request, GenerateRequest) else GenerateRequest.model_validate(request)
    except ValidationError as exc:
        raise RingserveError(ErrorCode.INVALID_REQUEST.value, str(exc)) from None
    return req.model_copy(update={"stream": stream})


def _is_no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get("Status") == NO_RESPONDERS_STATUS and not msg.data


def _unavailable(subject: str) -> RingserveError:
    return RingserveError(ErrorCode.UNAVAILABLE.value, f"no scheduler answers on {subject} (is `ringserve up` running?)")


# ---- the client --------------------------------------------------------------------------------


class RingserveClient:
    def __init__(self, nc: NATS, encoding: Encoding = "json", timeout: float = DEFAULT_TIMEOUT_S,
                 owns_connection: bool = False):
        if encoding not in CONTENT_TYPES:
            raise ValueError(f"encoding must be one of {sorted(CONTENT_TYPES)}, not {encoding!r}")
        self.nc = nc
        self.encoding = encoding
        self.timeout = timeout
        self._owns_connection = owns_connection

    @classmethod
    async def connect(cls, settings: Settings, encoding: Encoding = "json") -> "RingserveClient":
        async def _quiet(_exc: Exception) -> None:
            return None  # failures surface as exceptions of the calls themselves

        credentials = nats_auth_options(settings)
        try:
            # bounded as a whole: nats-py waits forever on a TLS handshake it cannot complete
            nc = await asyncio.wait_for(
                nats.connect(settings.nats_url, name="ringserve-client", connect_timeout=CONNECT_TIMEOUT_S,
                             max_reconnect_attempts=CONNECT_ATTEMPTS, reconnect_time_wait=RECONNECT_WAIT_S,
                             error_cb=_quiet, **credentials),
                CONNECT_BOUND_S)
        except Exception as exc:  # nats-py raises several unrelated types for an unreachable server
            raise RingserveError(ErrorCode.UNAVAILABLE.value,
                                 f"cannot connect to NATS at {settings.nats_url}: {exc}") from None
        return cls(nc, encoding, timeout=settings.request_timeout_s, owns_connection=True)

    async def close(self) -> None:
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> "RingserveClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.encoding]

    def _encode(self, message: BaseModel | dict[str, Any]) -> bytes:
        if isinstance(message, BaseModel):
            message = message.model_dump(mode="json", exclude_none=True)
        return codec.dump_public(message, self.content_type)

    async def _request(self, subject: str, message: BaseModel | dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            msg = await self.nc.request(subject, self._encode(message), timeout=timeout,
                                        headers={"Content-Type": self.content_type})
        except nats.errors.NoRespondersError:
            raise _unavailable(subject) from None
        except nats.errors.TimeoutError:
            raise RingserveError(ErrorCode.TIMEOUT.value, f"no reply on {subject} within {timeout:.1f}s") from None
        return decode_body(msg.data, (msg.headers or {}).get("Content-Type"))

    async def generate(self, request: GenerateRequest | dict[str, Any], timeout: float | None = None) -> GenerateReply:
        """One request, one reply; raises RingserveError on an error reply or timeout."""
        req = as_request(request, stream=False)
        body = await self._request(subjects.GENERATE, req, timeout or self.timeout)
        return GenerateReply.model_validate(body)

    async def stream(self, request: GenerateRequest | dict[str, Any],
                     timeout: float | None = None) -> AsyncIterator[Event]:
        """Events of one request until its DoneEvent. `timeout` bounds the silence between two
        messages, not the whole request: a long prefill keeps it alive with progress events."""
        req = as_request(request, stream=True)
        idle_timeout = timeout or self.timeout
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subjects.GENERATE, self._encode(req), reply=inbox,
                                  headers={"Content-Type": self.content_type})
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout)
                except nats.errors.TimeoutError:
                    raise RingserveError(ErrorCode.TIMEOUT.value, f"no stream message within {idle_timeout:.1f}s",
                                         req.request_id) from None
                if _is_no_responders(msg):
                    raise _unavailable(subjects.GENERATE)
                event = parse_event(decode_body(msg.data, (msg.headers or {}).get("Content-Type")))
                yield event
                if isinstance(event, DoneEvent):
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may already be closed
                pass

    async def cancel(self, request_id: str, timeout: float = CONTROL_TIMEOUT_S) -> CancelReply:
        body = await self._request(subjects.CANCEL, CancelRequest(request_id=request_id), timeout)
        return CancelReply.model_validate(body)

    async def status(self, timeout: float = CONTROL_TIMEOUT_S) -> StatusReply:
        body = await self._request(subjects.STATUS, {}, timeout)
        return StatusReply.model_validate(body)
