"""The `ringserve` command: argument parsing, the pure formatters (progress bar, summary, status,
Jaeger trace tree), `health` on real files, `trace` against a real HTTP server, and `generate` /
`status` against a real nats-server with the scheduler stand-in of test_client."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from services.cli import commands, main, terminal, traces, up
from shared import codec, subjects
from shared.kv.messages import KVStats
from shared.messages import GenerateReply, ServiceStatus, StatusReply, Timings, Usage, WorkerStatus
from tests.unit.test_client import ANSWER, free_port, private_nats, scheduler  # noqa: F401 (fixtures)

MS = 1000  # Jaeger times are microseconds
T0 = 1_700_000_000_000_000


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.run(argv, out, err)
    return code, out.getvalue(), err.getvalue()


# ---- arguments ---------------------------------------------------------------------------------


def test_parser_reads_every_command():
    parser = main.build_parser()
    up = parser.parse_args(["up", "--workers", "3", "--device", "cuda", "--model", "/m", "--demo-request"])
    assert (up.command, up.workers, up.device, up.model, up.demo_request) == ("up", 3, "cuda", "/m", True)
    gen = parser.parse_args(["generate", "some text", "--max-new-tokens", "5", "--temperature", "0.7", "--seed", "9"])
    assert commands.generate_request(gen) == {"prompt": "some text", "max_new_tokens": 5, "temperature": 0.7, "seed": 9}
    assert commands.generate_request(parser.parse_args(["generate", "x"])) == {"prompt": "x"}
    assert parser.parse_args(["serve", "fusion"]).name == "fusion"
    assert parser.parse_args(["serve", "gateway"]).name == "gateway"
    assert parser.parse_args(["trace", "req-1"]).jaeger == traces.JAEGER_URL
    assert parser.parse_args(["status", "--json"]).json


@pytest.mark.parametrize("argv", [[], ["serve", "router"], ["up", "--workers", "0"], ["up", "--device", "tpu"],
                                  ["generate"], ["health", "nobody"]])
def test_parser_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as info:
        main.build_parser().parse_args(argv)
    assert info.value.code == 2


# ---- formatters --------------------------------------------------------------------------------


def test_render_progress():
    assert terminal.render_progress(0, 1000, width=10) == "prefill [..........]   0% 0/1000 tokens"
    assert terminal.render_progress(250, 1000, width=10) == "prefill [##........]  25% 250/1000 tokens"
    assert terminal.render_progress(1000, 1000, width=10) == "prefill [##########] 100% 1000/1000 tokens"
    # out-of-range counts are clamped, an empty prompt is complete
    assert terminal.render_progress(2000, 1000, width=4) == "prefill [####] 100% 1000/1000 tokens"
    assert terminal.render_progress(0, 0, width=4) == "prefill [####] 100% 0/0 tokens"


def make_reply(tokens: int, ttft_ms: float, total_ms: float) -> GenerateReply:
    return GenerateReply(request_id="r-1", output_ids=[1] * tokens, text="x", finish_reason="length",
                         usage=Usage(prompt_tokens=4, completion_tokens=tokens),
                         timings=Timings(queue_ms=0.0, ttft_ms=ttft_ms, total_ms=total_ms))


def test_decode_rate_and_summary():
    # 11 tokens: the first at 200 ms, 10 more in the following 500 ms
    assert terminal.decode_rate(make_reply(11, 200.0, 700.0)) == pytest.approx(20.0)
    assert terminal.decode_rate(make_reply(1, 250.0, 250.0)) == pytest.approx(4.0)
    assert terminal.summary_line(make_reply(11, 200.0, 700.0)) == "11 tokens, ttft 200 ms, 20.0 tok/s, finish length (r-1)"


def test_unprinted_tail():
    assert terminal.unprinted_tail("Hello\ufffd", "Hello") == "\ufffd"
    assert terminal.unprinted_tail("Hello", "Hello") == ""
    assert terminal.unprinted_tail(None, "[5][6]") == ""  # no tokenizer: ids were printed
    assert terminal.unprinted_tail("other", "Hello") == ""  # never repeat or contradict what was printed


def test_stop_message():
    assert up.stop_message({"scheduler": 0, "worker-0": 0}) == "stopped; all exited cleanly"
    assert up.stop_message({}) == "stopped; all exited cleanly"
    assert up.stop_message({"scheduler": 0, "worker-0": -9, "fusion": 1}) == \
        "stopped; exited uncleanly: worker-0 (-9), fusion (1)"
    # nats-server's normal status after SIGTERM, not a failure
    assert up.stop_message({"nats-server": 1, "redis-server": 0}) == "stopped; all exited cleanly"
    assert up.stop_message({"nats-server": -9}) == "stopped; exited uncleanly: nats-server (-9)"


def test_format_status():
    workers = [WorkerStatus(worker_id="w-a", device="cpu", busy=True, active_requests=2, kv_tokens=512,
                            last_seen_s=0.4)]
    services = [ServiceStatus(service="fusion", instance="fusion-1", draining=False, last_seen_s=0.2),
                ServiceStatus(service="scheduler", instance="scheduler-1", draining=True, last_seen_s=0.7)]
    text = terminal.format_status(StatusReply(model="demo", workers=workers, queued_requests=1, active_requests=2,
                                         world_generation=5, world_ready=True, world_members=["w-a"],
                                         services=services))
    assert text.splitlines() == [
        "model: demo",
        "world: generation 5, ready, members w-a",
        "requests: 2 active, 1 queued",
        "workers: 1",
        "  w-a  cpu  busy  2 requests  512 kv tokens  seen 0.4s ago",
        "    tiers: pool 0 pages 0 B, host off",
        "services: 2",
        "  fusion  fusion-1  serving  seen 0.2s ago",
        "  scheduler  scheduler-1  draining  seen 0.7s ago",
    ]
    text = terminal.format_status(StatusReply(model="demo", workers=workers, queued_requests=1, active_requests=2,
                                         world_generation=5, world_ready=True, world_members=["w-a"],
                                         world_backend="gloo"))
    assert text.splitlines()[1] == "world: generation 5, ready, gloo, members w-a"


def test_format_status_shows_each_kv_tier():
    workers = [WorkerStatus(worker_id="w-a", device="cuda", busy=False, active_requests=0, kv_tokens=0,
                            last_seen_s=0.1, resident_pages=3, resident_bytes=3 * 512 * 1024,
                            host_tier_bytes=2 * 1024**2, host_tier_limit_bytes=4 * 1024**3)]
    kv = KVStats(blocks=7, bytes_stored=1024**3, shard_bytes=1024**3 // 4, budget_bytes=10 * 1024**3,
                 budget_source="maxmemory", shards=2, hit_rate=0.5)
    lines = terminal.format_status(StatusReply(model="demo", workers=workers, queued_requests=0, active_requests=0,
                                               world_generation=1), kv).splitlines()
    assert lines[4:7] == [
        "  w-a  cuda  idle  0 requests  0 kv tokens  seen 0.1s ago",
        "    tiers: pool 3 pages 1.5 MiB, host 2.0 MiB of 4.0 GiB",
        "kv store (redis): 1.2 GiB of 10.0 GiB budget (maxmemory), 7 blocks, 2 shards, hit rate 50%",
    ]
    unreachable = KVStats(error="kv metadata store unavailable", budget_bytes=2 * 1024**3, budget_source="fallback")
    assert terminal.kv_store_line(unreachable) == \
        "kv store (redis): kv metadata store unavailable; 2.0 GiB budget (fallback)"


def test_format_bytes():
    assert [terminal.format_bytes(n) for n in (0, 512, 1536, 5 * 1024**3, 3 * 1024**5)] == \
        ["0 B", "512 B", "1.5 KiB", "5.0 GiB", "3072.0 TiB"]


def jaeger_span(span_id, operation, start_ms, duration_ms, parent=None, process="p1", tags=()):
    return {
        "traceID": "abc", "spanID": span_id, "operationName": operation, "processID": process,
        "startTime": T0 + int(start_ms * MS), "duration": int(duration_ms * MS), "tags": list(tags),
        "references": [{"refType": "CHILD_OF", "traceID": "abc", "spanID": parent}] if parent else [],
    }


# Spans out of order, an error tag, and a span whose parent is not in the trace (shown as a root).
SAMPLE_TRACE = {"data": [{
    "traceID": "abc",
    "spans": [
        jaeger_span("d", "decode", 60, 40, parent="a", tags=[{"key": "error", "type": "bool", "value": True}]),
        jaeger_span("a", "generate", 0, 100),
        jaeger_span("c", "ring_attention", 10, 40, parent="b", process="p2"),
        jaeger_span("b", "prefill", 5, 55, parent="a", process="p2"),
        jaeger_span("x", "late_orphan", 90, 10, parent="gone", process="p2"),
    ],
    "processes": {"p1": {"serviceName": "ringserve-scheduler"}, "p2": {"serviceName": "ringserve-worker"}},
}]}


def test_format_trace_is_an_indented_timeline():
    assert traces.format_trace(SAMPLE_TRACE).splitlines() == [
        "trace abc  5 spans  100.0 ms",
        "      0.0 ms     100.0 ms |========================| ringserve-scheduler: generate",
        "      5.0 ms      55.0 ms | =============          |   ringserve-worker: prefill",
        "     10.0 ms      40.0 ms |  ==========            |     ringserve-worker: ring_attention",
        "     60.0 ms      40.0 ms |              ==========|   ringserve-scheduler: decode  [error]",
        "     90.0 ms      10.0 ms |                     ===| ringserve-worker: late_orphan",
    ]


def test_format_trace_without_traces():
    assert traces.format_trace({"data": []}) == "no trace found"


def test_trace_query_url():
    by_trace_id = traces.trace_query_url("http://j:16686/", "4bf92f3577b34da6a3ce929d0e0e4736", "svc", now_s=0)
    assert by_trace_id == "http://j:16686/api/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    url = urlsplit(traces.trace_query_url("http://j:16686", "req-1", "ringserve-scheduler", now_s=1000.0))
    query = parse_qs(url.query)
    assert url.path == "/api/traces"
    assert json.loads(query["tags"][0]) == {"request_id": "req-1"}
    assert query["service"] == ["ringserve-scheduler"]
    assert int(query["end"][0]) == 1000 * 10**6 and int(query["start"][0]) < int(query["end"][0])


# ---- health ------------------------------------------------------------------------------------


def test_health_follows_the_age_of_the_health_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("RINGSERVE_HEARTBEAT_INTERVAL_S", "1.0")
    assert run_cli(["health", "fusion"])[0] == 1  # no file yet
    path = tmp_path / "ringserve-fusion.health"
    path.write_text("x")
    assert run_cli(["health", "fusion"])[0] == 0
    stale = time.time() - 3 * 1.0 - 1
    os.utime(path, (stale, stale))
    code, _, err = run_cli(["health", "fusion"])
    assert code == 1 and "unhealthy" in err


def test_gateway_health_also_needs_its_http_health_endpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "ringserve-gateway.health").write_text("x")
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(statuses[0] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RINGSERVE_HTTP_PORT", str(server.server_port))
        statuses[:] = [200]
        assert run_cli(["health", "gateway"])[0] == 0
        statuses[:] = [503]
        code, _, err = run_cli(["health", "gateway"])
        assert code == 1 and "HTTP 503" in err
    finally:
        server.shutdown()
        server.server_close()
    code, _, err = run_cli(["health", "gateway"])  # nothing listens any more
    assert code == 1 and "unreachable" in err


# ---- trace against a real HTTP server ----------------------------------------------------------


@pytest.fixture
def fake_jaeger():
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            found = "req-known" in self.path
            body = json.dumps(SAMPLE_TRACE if found else {"data": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()
    server.server_close()


def test_trace_command_prints_the_tree(fake_jaeger):
    url, requests = fake_jaeger
    code, out, _ = run_cli(["trace", "req-known", "--jaeger", url])
    assert code == 0
    assert out.strip() == traces.format_trace(SAMPLE_TRACE)
    assert requests and requests[0].startswith("/api/traces?")
    code, _, err = run_cli(["trace", "req-unknown", "--jaeger", url])
    assert code == 1 and "no trace found for req-unknown" in err


def test_trace_command_without_jaeger():
    code, _, err = run_cli(["trace", "req-1", "--jaeger", f"http://127.0.0.1:{free_port()}"])
    assert code == 1 and "Jaeger is not reachable" in err


# ---- generate / status against NATS ------------------------------------------------------------
# The CLI runs its own event loop; it runs in a thread so the scheduler stand-in keeps answering
# on the test's loop.


async def in_thread(argv: list[str]) -> tuple[int, str, str]:
    return await asyncio.to_thread(run_cli, argv)


async def test_generate_streams_text_progress_and_summary(private_nats, scheduler, monkeypatch):
    monkeypatch.setenv("RINGSERVE_NATS_URL", private_nats)
    code, out, err = await in_thread(["generate", "hi", "--max-new-tokens", "3"])
    assert code == 0
    assert out == "".join(ANSWER) + "\n"
    assert terminal.render_progress(8, 8) in err  # the finished bar
    assert err.rstrip().endswith(f"{len(ANSWER)} tokens, ttft 20 ms, 50.0 tok/s, finish length (req-fake)")


async def test_generate_json_and_errors(private_nats, scheduler, monkeypatch):
    monkeypatch.setenv("RINGSERVE_NATS_URL", private_nats)
    code, out, _ = await in_thread(["generate", "hi", "--json"])
    assert code == 0 and json.loads(out)["text"] == "".join(ANSWER)
    code, out, err = await in_thread(["generate", "fail"])
    assert code == 1 and err.strip() == "error: too_long: too long"


async def test_status_command(private_nats, scheduler, monkeypatch):
    monkeypatch.setenv("RINGSERVE_NATS_URL", private_nats)
    code, out, _ = await in_thread(["status"])
    # no kvstore answers: no Redis line, and no wait for one
    assert code == 0 and "workers: 2" in out and "  w-1  cpu  idle" in out and "kv store" not in out
    code, out, _ = await in_thread(["status", "--json"])
    assert code == 0 and json.loads(out)["world_generation"] == 3 and "kv_store" not in json.loads(out)


async def test_status_command_shows_the_redis_tier_from_the_kvstore(private_nats, scheduler, monkeypatch):
    import nats

    nc = await nats.connect(private_nats)
    stats = KVStats(blocks=4, bytes_stored=3 * 1024**2, budget_bytes=8 * 1024**3, budget_source="system_memory")

    async def kvstore(msg) -> None:  # the kvstore stand-in
        await msg.respond(codec.encode(stats))

    await nc.subscribe(subjects.KV_STATS, cb=kvstore)
    await nc.flush()
    monkeypatch.setenv("RINGSERVE_NATS_URL", private_nats)
    try:
        code, out, _ = await in_thread(["status"])
        assert code == 0 and "kv store (redis): 3.0 MiB of 8.0 GiB budget (system_memory), 4 blocks" in out
        code, out, _ = await in_thread(["status", "--json"])
        assert code == 0 and json.loads(out)["kv_store"]["budget_bytes"] == 8 * 1024**3
    finally:
        await nc.drain()


def test_status_without_nats(monkeypatch):
    monkeypatch.setenv("RINGSERVE_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    code, _, err = run_cli(["status"])
    assert code == 1 and err.startswith("error: unavailable: cannot connect to NATS")


def test_up_without_servers_installed_exits_2_with_the_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither nats-server nor redis-server can be found
    monkeypatch.setattr("services.cli.stack.EXTRA_BINARY_DIRS", ())
    monkeypatch.setenv("RINGSERVE_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    code, _, err = run_cli(["up", "--state-dir", str(tmp_path / "state")])
    assert code == 2
    assert "nats-server is not reachable" in err and "apt-get install nats-server redis-server" in err
