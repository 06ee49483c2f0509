"""The gateway's HTTP side without a stack: SSE chunk shapes, auth, metrics, errors and the trace
context, with Starlette's test client and a RingserveClient on a fake NATS connection."""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from services.gateway.app import GatewayDeps, build_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.sse import ChunkShapes, StreamOutcome, sse_chunks
from services.gateway.tracing import TracingConnection
from shared.client import RingserveClient, RingserveError
from shared.messages import DoneEvent, ProgressEvent, TokenEvent

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0}
TIMINGS = {"queue_ms": 0, "ttft_ms": 1, "total_ms": 2}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def done(request_id="gw-1", text="Hé", **fields) -> DoneEvent:
    return DoneEvent(request_id=request_id, output_ids=[1, 2], text=text, finish_reason="length", usage=USAGE,
                     timings=TIMINGS, **fields)


async def events(*items):
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield item


def collect(kind, items, include_usage=False):
    async def run():
        shapes = ChunkShapes(kind, "gw-1", 7, "demo", include_usage)
        return [c async for c in sse_chunks(events(*items), shapes, StreamOutcome(), lambda i: f"t{i}")]

    lines = asyncio.run(run())
    assert lines[-1] == b"data: [DONE]\n\n" and all(line.endswith(b"\n\n") for line in lines)
    return [json.loads(line[len(b"data: "):]) for line in lines[:-1]]


# ---- SSE shapes -------------------------------------------------------------------------------
def test_chat_chunks_open_with_the_role_then_content_then_finish_and_usage():
    tokens = [TokenEvent(request_id="gw-1", index=0, token_id=1, text="H"),
              TokenEvent(request_id="gw-1", index=1, token_id=2, text="")]  # held back: half a character
    chunks = collect("chat", [ProgressEvent(request_id="gw-1", done_tokens=1, total_tokens=2), *tokens, done()],
                     include_usage=True)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-gw-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"]["content"] == "H" and chunks[1]["usage"] is None
    # the final chunk flushes what the tokens held back
    assert chunks[2]["choices"][0] == {"index": 0, "delta": {"role": None, "content": "é"},
                                       "finish_reason": "length", "logprobs": None}
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 5
    assert len(chunks) == 4


def test_completion_chunks_carry_text_and_logprobs_and_no_usage_unless_asked():
    tokens = [TokenEvent(request_id="gw-1", index=0, token_id=9, text="Hé", logprob=-0.25)]
    chunks = collect("completion", [*tokens, done()])
    assert [c["object"] for c in chunks] == ["text_completion"] * 2
    assert chunks[0]["choices"][0]["text"] == "Hé"
    assert chunks[0]["choices"][0]["logprobs"] == {"tokens": ["t9"], "token_logprobs": [-0.25],
                                                   "top_logprobs": None, "text_offset": [0]}
    assert chunks[1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[1]


def test_an_error_mid_stream_is_an_error_event_before_done():
    chunks = collect("completion", [TokenEvent(request_id="gw-1", index=0, token_id=1, text="a"),
                                    RingserveError("unavailable", "worker lost")])
    assert chunks[-1] == {"error": {"message": "worker lost", "type": "service_unavailable_error", "param": None,
                                    "code": "unavailable"}}


# ---- the app over a fake NATS connection --------------------------------------------------------
class Msg:
    def __init__(self, body):
        self.data = json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json"}


class FakeNats:
    """Answers generate and status; records what was sent and with which headers."""

    is_connected = True

    def __init__(self, generate_reply):
        self.generate_reply = generate_reply
        self.sent: list[tuple[str, dict, dict]] = []

    async def request(self, subject, payload=b"", timeout=0.5, old_style=False, headers=None):
        self.sent.append((subject, json.loads(payload), dict(headers or {})))
        if subject.endswith("status"):
            return Msg({"model": "demo", "workers": [], "queued_requests": 0, "active_requests": 0,
                        "world_generation": 0})
        return Msg(self.generate_reply)


@pytest.fixture
def spans():
    return InMemorySpanExporter()


def make_client(spans, reply=None, api_keys=()):
    reply = reply or done().model_dump(exclude={"type"})
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    nats = FakeNats(reply)
    deps = GatewayDeps(client=RingserveClient(TracingConnection(nats)), metrics=GatewayMetrics(),
                       tracer=provider.get_tracer("test"), api_keys=tuple(api_keys), max_request_bytes=4096,
                       default_max_tokens=64)
    return TestClient(build_app(deps)), nats


COMPLETION = {"model": "demo", "prompt": "Hi", "max_tokens": 2, "temperature": 0}


def test_a_completion_over_the_fake_bus(spans):
    http, nats = make_client(spans)
    response = http.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "Hé"
    subject, body, _ = nats.sent[-1]
    assert subject == "ringserve.v1.generate" and body["prompt"] == "Hi" and body["max_new_tokens"] == 2
    assert body["request_id"].startswith("gw-")


def test_the_gateway_span_is_the_root_and_its_context_rides_the_nats_request(spans):
    http, nats = make_client(spans)
    http.post("/v1/completions", json=COMPLETION)
    (span,) = spans.get_finished_spans()
    assert span.name == "gateway.request" and span.parent is None
    traceparent = nats.sent[-1][2]["traceparent"]
    assert traceparent.split("-")[1] == format(span.context.trace_id, "032x")
    assert traceparent.split("-")[2] == format(span.context.span_id, "016x")  # the scheduler's parent


def test_an_incoming_traceparent_is_honoured(spans):
    http, nats = make_client(spans)
    http.post("/v1/completions", json=COMPLETION, headers={"traceparent": INCOMING})
    (span,) = spans.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID and span.parent.span_id == 0x00f067aa0ba902b7
    assert nats.sent[-1][2]["traceparent"].split("-")[1] == TRACE_ID


def test_api_keys_and_the_endpoints_that_need_none(spans):
    http, _ = make_client(spans, api_keys=("k1", "k2"))
    assert http.get("/v1/models").status_code == 401
    wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    ok = http.get("/v1/models", headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "demo"
    assert http.get("/health").json() == {"status": "ok"}
    metrics = http.get("/metrics").text
    assert 'ringserve_gateway_requests_total{endpoint="models",status="401"} 2.0' in metrics
    assert 'ringserve_gateway_request_latency_ms_count{endpoint="models"} 3.0' in metrics


def test_error_replies_of_the_bus_keep_their_meaning(spans):
    http, _ = make_client(spans, reply={"error": {"code": "too_long", "message": "prompt too long"}})
    response = http.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    http, _ = make_client(spans, reply={"error": {"code": "overloaded", "message": "busy"}})
    assert http.post("/v1/completions", json=COMPLETION).status_code == 429


def test_bad_bodies_are_400_in_openais_shape(spans):
    http, _ = make_client(spans)
    assert http.post("/v1/completions", content=b"{not json").json()["error"]["code"] == "invalid_request"
    assert http.post("/v1/completions", content=b"x" * 5000).status_code == 400  # over max_request_bytes
    missing = http.post("/v1/completions", json={"model": "demo"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
