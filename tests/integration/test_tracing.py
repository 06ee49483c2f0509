"""One distributed trace per request: spans from all four services, correctly parented, received
by a real OTLP/HTTP endpoint (protobuf decoded)."""

import pytest

from tests.helpers.otlp import OtlpHttpReceiver, decode_spans
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


async def test_a_request_leaves_one_trace_across_all_four_services(tmp_path):
    with OtlpHttpReceiver() as receiver:
        stack = Stack(tmp_path, workers=2, services=("fusion", "scheduler", "kvstore"), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "RINGSERVE_CHUNK_TOKENS": "8",
            "RINGSERVE_KV_BLOCK_TOKENS": "16",
        })
        try:
            await stack.wait_ready(2)
            reply = await stack.generate({"prompt": "a prompt that spans two workers", "max_new_tokens": 4,
                                          "request_id": "trace-1"})
            assert "error" not in reply, f"{reply}\n{stack.logs()}"
            assert len(reply["placement"]["workers"]) == 2
        finally:
            codes = stack.stop()  # services flush their spans on the way out
        assert all(code == 0 for code in codes.values()), codes
        spans = decode_spans(receiver.bodies["/v1/traces"])

    roots = [s for s in spans if s.name == "scheduler.generate" and s.attributes.get("request_id") == "trace-1"]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    trace = [s for s in spans if s.trace_id == root.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert {s.service for s in trace} >= {"ringserve-scheduler", "ringserve-worker", "ringserve-fusion",
                                          "ringserve-kvstore"}, sorted({(s.service, s.name) for s in trace})
    # exactly one root, every other span's parent is in the same trace
    assert [s for s in trace if not s.parent_span_id] == [root]
    assert all(s.parent_span_id in by_id for s in trace if s is not root)

    def parent(span):
        return by_id[span.parent_span_id]

    prefills = [s for s in trace if s.name == "worker.prefill"]
    assert len(prefills) == 2
    assert all(parent(s).name == "scheduler.prefill" and parent(parent(s)) == root for s in prefills)
    assert all("ring.layer" in s.events for s in prefills)  # ring steps with bytes and wait
    merges = [s for s in trace if s.name == "fusion.merge"]
    assert merges and all(parent(s).name == "worker.decode" and parent(parent(s)) == root for s in merges)
    assert any(s.name.startswith("kvstore.") and s.service == "ringserve-kvstore" for s in trace)
    assert any(s.name == "scheduler.reply" and parent(s) == root for s in trace)
