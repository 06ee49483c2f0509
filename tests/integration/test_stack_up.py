"""`ringserve up` as a user runs it: a subprocess that starts every service, answers
`ringserve generate`, and on SIGINT stops all of its children."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shared.client import RingserveClient
from shared.messages import GenerateReply
from shared.settings import Settings
from tests.integration.stack import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

READY_LINE = "ringserve is up"
READY_TIMEOUT_S = 60.0
MAX_NEW_TOKENS = 5


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the ppid is the 2nd field after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def generate_once(settings: Settings, request: dict) -> GenerateReply:
    async with await RingserveClient.connect(settings) as client:
        return await client.generate(request, timeout=60)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """Lines of proc.stdout up to the one holding `marker`; fails on exit or timeout."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"no {marker!r} within {timeout}s (exit {proc.poll()}):\n{''.join(lines)}")
    return lines


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc")
def test_up_generate_and_sigint(servers, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RINGSERVE_NATS_URL": servers.nats_url,
        "RINGSERVE_REDIS_URL": servers.redis_url,
        "RINGSERVE_DEMO_DIR": str(tmp_path / "demo-model"),
        "RINGSERVE_HEARTBEAT_INTERVAL_S": "0.25",
        "OMP_NUM_THREADS": "1",
        "RINGSERVE_HTTP_PORT": str(free_port()),
    }
    up = subprocess.Popen(cli("up", "--workers", "1", "--state-dir", str(tmp_path / "state")), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(up, READY_LINE, READY_TIMEOUT_S)
        children = children_of(up.pid)
        # servers already run, so the stack started only the five services
        assert len(children) == 5, children
        # the gateway listened before the ready line, and its container health check passes
        health = subprocess.run(cli("health", "gateway"), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=30)
        assert health.returncode == 0, health.stderr

        streamed = subprocess.run(cli("generate", "hi", "--max-new-tokens", str(MAX_NEW_TOKENS)), cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=60)
        assert streamed.returncode == 0, streamed.stderr
        summary = re.search(r"^(\d+) tokens, ttft \d+ ms, [\d.]+ tok/s, finish (length|stop)", streamed.stderr,
                            re.MULTILINE)
        assert summary, streamed.stderr
        assert 1 <= int(summary.group(1)) <= MAX_NEW_TOKENS

        # greedy decoding is deterministic: what the CLI printed is the text of the same request
        reply = asyncio.run(generate_once(Settings(nats_url=servers.nats_url),
                                          {"prompt": "hi", "max_new_tokens": MAX_NEW_TOKENS}))
        assert streamed.stdout == reply.text + "\n"
        assert reply.usage.completion_tokens == int(summary.group(1))
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    stderr = up.stderr.read()
    assert up.returncode == 0, stderr
    assert "stopped; all exited cleanly" in stderr
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children), [pid for pid in children if alive(pid)]
