"""A real ringserve stack for integration tests: private nats-server and redis-server on free
ports, and each service as its own process (`python -m services.<name>`), as in production."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats

from services.cli import stack
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str:
    path = stack.find_binary(name)
    if path is None:
        raise RuntimeError(f"{name} not found:\n{stack.INSTALL_HINT}")
    return path


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Servers:
    """nats-server (JetStream) and redis-server on free loopback ports."""

    def __init__(self, workdir: Path):
        self.nats_port, self.redis_port = free_port(), free_port()
        (workdir / "js").mkdir(parents=True, exist_ok=True)
        # The same server settings as `ringserve up` (max_payload raised to the request limit).
        config = stack.write_nats_config(workdir / "nats.conf", Settings().max_request_bytes)
        self.procs = [
            subprocess.Popen(stack.nats_command(find_binary("nats-server"), "127.0.0.1", self.nats_port, workdir / "js",
                                                config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen(stack.redis_command(find_binary("redis-server"), "127.0.0.1", self.redis_port),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        wait_port(self.nats_port)
        wait_port(self.redis_port)

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


class Stack:
    """scheduler + fusion (+ kvstore) + N workers, each a real process, on private servers."""

    def __init__(self, workdir: Path, workers: int, env: dict[str, str] | None = None,
                 services: tuple[str, ...] = ("fusion", "scheduler"), metrics: bool = False):
        # Each stack has its own servers: two stacks alive at once never see each other's services.
        self.servers = Servers(workdir / "servers")
        self.workdir = workdir
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
            "RINGSERVE_NATS_URL": self.servers.nats_url,
            "RINGSERVE_REDIS_URL": self.servers.redis_url,
            "RINGSERVE_DEMO_DIR": str(workdir / "demo-model"),
            "RINGSERVE_HEARTBEAT_INTERVAL_S": "0.25",
            "RINGSERVE_HEARTBEAT_TIMEOUT_S": "2.0",
            "RINGSERVE_DIST_TIMEOUT_S": "15",
            "RINGSERVE_FUSION_TIMEOUT_S": "15",
            "RINGSERVE_REQUEST_TIMEOUT_S": "120",
            "OMP_NUM_THREADS": "1",
            "RINGSERVE_LOG_LEVEL": "info",
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()
        # label -> Prometheus port, when each process serves its metrics
        self.metrics_ports: dict[str, int] | None = {} if metrics else None
        try:
            for name in services:
                self.start(name)
            for i in range(workers):
                self.start("worker", f"worker{i}")
        except BaseException:
            self.stop()
            raise

    def start(self, service: str, label: str | None = None) -> subprocess.Popen:
        label = label or service
        log = open(self.workdir / f"{label}.log", "ab")
        env = self.env
        if service == "worker" and env.get("RINGSERVE_DEVICE") == "cuda":
            from services.cli.stack import visible_gpus

            gpus = visible_gpus()
            env = {**env, "CUDA_VISIBLE_DEVICES": gpus[len([p for p in self.procs if p.startswith("worker")]) % len(gpus)]}
        if self.metrics_ports is not None:
            self.metrics_ports[label] = free_port()
            env = {**env, "RINGSERVE_METRICS_PORT": str(self.metrics_ports[label])}
        proc = subprocess.Popen([sys.executable, "-m", f"services.{service}"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[label] = proc
        return proc

    def logs(self) -> str:
        out = []
        for label in self.procs:
            path = self.workdir / f"{label}.log"
            if path.exists():
                out.append(f"--- {label} ---\n" + path.read_text()[-3000:])
        return "\n".join(out)

    async def status(self, nc) -> dict:
        msg = await nc.request("ringserve.v1.status", b"{}", timeout=2)
        return json.loads(msg.data)

    async def wait_ready(self, workers: int, timeout: float = 90.0, world: bool = True) -> dict:
        nc = await nats.connect(self.servers.nats_url)
        try:
            deadline = time.monotonic() + timeout
            last = None
            while time.monotonic() < deadline:
                for label, p in self.procs.items():
                    if p.poll() is not None and label not in self.killed:
                        raise RuntimeError(f"{label} exited with {p.returncode}\n{self.logs()}")
                try:
                    last = await self.status(nc)
                    if len(last["workers"]) == workers and (not world or workers == 1 or
                                                            (last["world_ready"] and len(last["world_members"]) == workers)):
                        return last
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    pass
                await asyncio.sleep(0.2)
            raise RuntimeError(f"stack not ready: {last}\n{self.logs()}")
        finally:
            await nc.close()

    async def generate(self, body: dict, timeout: float = 120.0) -> dict:
        """One JSON request on the public API; the decoded reply (or error)."""
        nc = await nats.connect(self.servers.nats_url)
        try:
            msg = await nc.request("ringserve.v1.generate", json.dumps(body).encode(), timeout=timeout)
            return json.loads(msg.data)
        finally:
            await nc.close()

    def kill(self, label: str, sig: int = signal.SIGKILL) -> None:
        self.killed.add(label)
        self.procs[label].send_signal(sig)
        self.procs[label].wait(10)

    def stop(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for label, p in self.procs.items():
            try:
                codes[label] = p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[label] = p.wait()
        self.servers.stop()
        return codes
