"""LocalStack, the supervisor behind `ringserve up`: server detection and launch with real
nats-server / redis-server on free ports (never the shared 4222/6379), the install hint when a
binary is missing, child death detection, and SIGTERM-then-SIGKILL stops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli.stack import (
    PROJECT_ROOT,
    LocalStack,
    MissingServerError,
    StackError,
    exited_cleanly,
    find_binary,
    host_port,
    is_ready,
    nats_command,
    port_open,
    redis_command,
    stop_processes,
)
from shared.messages import StatusReply, WorkerStatus
from shared.settings import Settings
from tests.unit.test_client import free_port, private_nats, scheduler, wait_port  # noqa: F401 (fixtures)

NATS = find_binary("nats-server")
REDIS = find_binary("redis-server")
needs_servers = pytest.mark.skipif(NATS is None or REDIS is None, reason="nats-server/redis-server not installed")


def private_settings(nats_port: int, redis_port: int) -> Settings:
    return Settings(nats_url=f"nats://127.0.0.1:{nats_port}", redis_url=f"redis://127.0.0.1:{redis_port}/0")


def test_host_port():
    assert host_port("nats://10.0.0.5:4333", 4222) == ("10.0.0.5", 4333)
    assert host_port("nats://localhost", 4222) == ("localhost", 4222)
    assert host_port("redis://127.0.0.1:7000/0,redis://127.0.0.1:7001/0", 6379) == ("127.0.0.1", 7000)
    assert host_port("127.0.0.1:5000", 1) == ("127.0.0.1", 5000)


def status_of(workers: int, world_members: int, world_ready: bool) -> StatusReply:
    listed = [WorkerStatus(worker_id=f"w-{i}", device="cpu", busy=False, active_requests=0, kv_tokens=0,
                           last_seen_s=0.0) for i in range(workers)]
    return StatusReply(model="demo", workers=listed, queued_requests=0, active_requests=0, world_generation=1,
                       world_ready=world_ready, world_members=[f"w-{i}" for i in range(world_members)])


def test_is_ready_needs_every_worker_and_a_formed_world():
    assert is_ready(status_of(1, 0, False), workers=1)  # one worker needs no distributed world
    assert not is_ready(status_of(0, 0, False), workers=1)
    assert not is_ready(status_of(2, 2, False), workers=2)
    assert not is_ready(status_of(2, 1, True), workers=2)
    assert is_ready(status_of(2, 2, True), workers=2)


def test_server_commands():
    assert nats_command("nats-server", "127.0.0.1", 5, "/s") == ["nats-server", "-a", "127.0.0.1", "-p", "5",
                                                                "-js", "-sd", "/s"]
    assert redis_command("redis-server", "127.0.0.1", 6) == ["redis-server", "--bind", "127.0.0.1", "--port", "6",
                                                            "--save", "", "--appendonly", "no"]


def test_find_binary_looks_in_the_given_path(tmp_path):
    tool = tmp_path / "nats-server"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert find_binary("nats-server", str(tmp_path)) == str(tool)
    assert find_binary("redis-server", str(tmp_path)) is None


@needs_servers
def test_running_servers_are_used_not_started(tmp_path):
    nats_port, redis_port = free_port(), free_port()
    nats = subprocess.Popen(nats_command(NATS, "127.0.0.1", nats_port, tmp_path / "js"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = subprocess.Popen(redis_command(REDIS, "127.0.0.1", redis_port),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(nats_port, nats)
        wait_port(redis_port, redis)
        stack = LocalStack(private_settings(nats_port, redis_port), state_dir=tmp_path / "state")
        stack.start_servers()
        assert stack.servers == []
        stack.stop(timeout=5)
        # stopping the stack leaves servers it did not start alone
        assert nats.poll() is None and redis.poll() is None
    finally:
        for proc in (nats, redis):
            proc.terminate()
            proc.wait(timeout=10)


@needs_servers
def test_missing_servers_are_started_and_stopped(tmp_path):
    nats_port, redis_port = free_port(), free_port()
    stack = LocalStack(private_settings(nats_port, redis_port), state_dir=tmp_path / "state")
    try:
        stack.start_servers()
        assert [s.name for s in stack.servers] == ["nats-server", "redis-server"]
        assert port_open("127.0.0.1", nats_port) and port_open("127.0.0.1", redis_port)
        assert (tmp_path / "state" / "logs" / "nats-server.log").exists()
        procs = [s.proc for s in stack.servers]
    finally:
        codes = stack.stop(timeout=5)
    assert set(codes) == {"nats-server", "redis-server"}
    assert all(exited_cleanly(name, code) for name, code in codes.items()), codes
    assert all(p.poll() is not None for p in procs)
    assert not port_open("127.0.0.1", nats_port) and not port_open("127.0.0.1", redis_port)
    assert stack.servers == []


@needs_servers
def test_started_nats_accepts_a_request_of_the_configured_size(tmp_path):
    """nats-server's own default max_payload is 1 MiB; the stack raises it to max_request_bytes."""
    import asyncio

    import nats

    settings = private_settings(free_port(), free_port()).model_copy(update={"max_request_bytes": 3 * 1024 * 1024})
    stack = LocalStack(settings, state_dir=tmp_path / "state")

    async def server_max_payload() -> int:
        nc = await nats.connect(settings.nats_url)
        try:
            return nc.max_payload
        finally:
            await nc.close()

    try:
        stack.start_servers()
        assert asyncio.run(server_max_payload()) == 3 * 1024 * 1024
    finally:
        stack.stop(timeout=5)


def test_missing_binary_gives_the_install_hint(tmp_path):
    stack = LocalStack(private_settings(free_port(), free_port()), state_dir=tmp_path, search_path=str(tmp_path))
    with pytest.raises(MissingServerError) as info:
        stack.start()
    assert "apt-get install nats-server redis-server" in str(info.value)
    assert "brew install" in str(info.value)


def test_unreachable_remote_server_is_not_started(tmp_path):
    settings = Settings(nats_url="nats://192.0.2.1:4222")  # TEST-NET-1: never routable
    with pytest.raises(StackError, match="not reachable"):
        LocalStack(settings, state_dir=tmp_path).start_servers()


def test_child_env_carries_connections_and_model(tmp_path):
    stack = LocalStack(private_settings(1111, 2222), model="/models/x", device="cuda", state_dir=tmp_path)
    env = stack.child_env()
    assert env["RINGSERVE_NATS_URL"] == "nats://127.0.0.1:1111"
    assert env["RINGSERVE_REDIS_URL"] == "redis://127.0.0.1:2222/0"
    assert (env["RINGSERVE_MODEL"], env["RINGSERVE_DEVICE"]) == ("/models/x", "cuda")
    assert str(PROJECT_ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_a_dead_child_is_reported_with_its_log(tmp_path):
    # A stand-in interpreter that fails at once, naming the module it was asked to run.
    fake_python = tmp_path / "fake-python"
    fake_python.write_text("#!/bin/sh\necho \"cannot start $2\" >&2\nexit 3\n")
    fake_python.chmod(0o755)
    stack = LocalStack(Settings(), workers=2, state_dir=tmp_path / "state", python=str(fake_python))
    stack.start_services()
    try:
        assert [c.name for c in stack.services] == ["kvstore", "fusion", "scheduler", "gateway", "worker-0", "worker-1"]
        for child in stack.services:
            child.proc.wait(timeout=10)
        with pytest.raises(StackError) as info:
            stack.check_alive()
        assert "kvstore exited with code 3" in str(info.value)
        assert "cannot start services.kvstore" in str(info.value)
    finally:
        stack.stop(timeout=5)


def test_stop_processes_kills_what_ignores_sigterm():
    stubborn = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready" and polite.stdout.readline().strip() == "ready"
    stop_processes([stubborn, polite], timeout=1.0)
    assert stubborn.returncode == -9  # SIGKILL
    assert polite.returncode == -15  # SIGTERM was enough
    stubborn.stdout.close()
    polite.stdout.close()


async def test_wait_ready_waits_for_all_workers(private_nats, scheduler, tmp_path):
    # the scheduler stand-in reports 2 workers and no formed world
    settings = Settings(nats_url=private_nats)
    status = await LocalStack(settings, workers=1, state_dir=tmp_path).wait_ready(timeout=5)
    assert len(status.workers) == 2
    with pytest.raises(StackError, match="2 of 2 workers registered, world forming"):
        await LocalStack(settings, workers=2, state_dir=tmp_path).wait_ready(timeout=1)
    with pytest.raises(StackError, match="2 of 3 workers registered"):
        await LocalStack(settings, workers=3, state_dir=tmp_path).wait_ready(timeout=1)


def test_a_service_that_dies_is_restarted_with_a_growing_backoff_and_a_dead_server_stops_all(tmp_path):
    fake_python = tmp_path / "fake-python"
    fake_python.write_text("#!/bin/sh\necho \"crashed $2\" >&2\nexit 3\n")
    fake_python.chmod(0o755)
    stack = LocalStack(Settings(), workers=1, state_dir=tmp_path / "state", python=str(fake_python))
    stack.start_services()
    try:
        for child in stack.services:
            child.proc.wait(timeout=10)
        t0 = 1000.0
        lines = stack.supervise(now=t0)
        assert len(lines) == len(stack.services)
        assert "fusion exited with code 3; restarting it in 0.5s (restart 1 in a row)" in "\n".join(lines)
        assert "crashed services.fusion" in "\n".join(lines)  # the crash's own lines come with it
        assert stack.supervise(now=t0 + 0.1) == []  # waiting out the backoff
        assert all(line.endswith("restarted") for line in stack.supervise(now=t0 + 0.6))
        fusion = next(c for c in stack.services if c.name == "fusion")
        fusion.proc.wait(timeout=10)
        again = [line for line in stack.supervise(now=t0 + 0.7) if line.startswith("fusion")]
        assert again and "restarting it in 1s (restart 2 in a row)" in again[0]
        assert fusion.log_path.read_text().count("crashed services.fusion") == 2  # one log, both runs

        stack.servers.append(stack._spawn("nats-server", [str(fake_python), "-m", "nats"]))
        stack.servers[-1].proc.wait(timeout=10)
        with pytest.raises(StackError, match="nats-server exited with code 3"):
            stack.supervise(now=t0 + 1)
    finally:
        stack.stop(timeout=5)
