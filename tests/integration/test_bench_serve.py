"""`bench/serve.py` end to end in its smoke mode: a subprocess that starts the services on the
session's private nats-server and redis-server (so it never meets a developer's stack or another
test's), streams requests through the public API and writes every figure as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BENCH = REPO / "bench" / "serve.py"
RUN_TIMEOUT_S = 200
TINY_LENGTHS = [64, 256]
TINY_NEW_TOKENS = 16
TINY_CONCURRENT = 8
TINY_CONCURRENT_NEW_TOKENS = 32


def finished_as_asked(request: dict) -> bool:
    """All requested tokens, or fewer ended by a stop (an eos token)."""
    n, asked = request["completion_tokens"], request["max_new_tokens"]
    return n == asked or (request["finish_reason"] == "stop" and 1 <= n <= asked)


def test_bench_serve_tiny(servers, tmp_path):
    out = tmp_path / "x.json"
    env = {
        **os.environ,
        "RINGSERVE_NATS_URL": servers.nats_url,
        "RINGSERVE_REDIS_URL": servers.redis_url,
        "RINGSERVE_HEARTBEAT_INTERVAL_S": "0.25",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--configs", "defaults", "--no-peers",
               "--workdir", str(tmp_path / "work"), "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| defaults | 64 |" in run.stdout  # the table is printed last

    result = json.loads(out.read_text())
    assert result["command"] and result["date"] and result["device"] and result["torch"]
    assert result["shape"]["layers"] == 3 and result["shape"]["hidden"] == 128
    assert result["peer"] == {"skipped": "--no-peers"}
    assert list(result["configs"]) == ["defaults"]
    config = result["configs"]["defaults"]
    assert "error" not in config, config["error"]

    single = config["single"]
    assert [case["prompt_tokens"] for case in single] == TINY_LENGTHS
    for case in single:
        assert case["ttft_ms"] > 0 and case["server_ttft_ms"] > 0 and case["decode_tok_s"] > 0, case
    concurrent = config["concurrent"]
    assert concurrent["requests_at_once"] == len(concurrent["requests"]) == TINY_CONCURRENT
    for key in ("batch_decode_tok_s", "aggregate_tok_s", "ttft_p50_ms", "ttft_p99_ms", "decode_tok_s_median"):
        assert concurrent[key] > 0, (key, concurrent)
    assert concurrent["ttft_p50_ms"] <= concurrent["ttft_p99_ms"]

    assert all(r["max_new_tokens"] == TINY_NEW_TOKENS for case in single for r in case["requests"])
    assert all(r["max_new_tokens"] == TINY_CONCURRENT_NEW_TOKENS for r in concurrent["requests"])
    requests = [r for case in single for r in case["requests"]] + concurrent["requests"]
    assert all(finished_as_asked(r) for r in requests), [r for r in requests if not finished_as_asked(r)]
    assert all(r["ttft_ms"] > 0 for r in requests)

    # the worker's engine alone, in the bench's process: the services' share is the difference
    engine = result["engine"]
    assert [case["prompt_tokens"] for case in engine["single"]] == TINY_LENGTHS
    assert all(case["decode_tok_s"] > 0 for case in engine["single"])
    assert engine["concurrent"]["batch_decode_tok_s"] > 0
