"""docker-compose.yml and what it mounts, checked without Docker: the official compose-spec schema
(shipped by check-jsonschema), then what the schema cannot know (health checks, .env.example,
the image, nats.conf run by a real nats-server, Prometheus targets)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import nats
import pytest
import yaml

from shared import subjects
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "infra" / "entrypoint.sh"
NATS_CONF = ROOT / "infra" / "nats" / "nats.conf"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"

RINGSERVE_SERVICES = ("scheduler", "kvstore", "fusion", "worker", "gateway")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(node, env: dict[str, str]):
    """Compose's ${...} substitution over a loaded document (defaults and required markers)."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.groups()
        value = env.get(name)
        if operator in (":-", "-"):
            return value if value else argument
        if operator in (":?", "?") and not value:
            raise KeyError(f"{name}: {argument}")
        return value or ""

    return INTERPOLATION.sub(substitute, node)


def referenced_variables(text: str) -> dict[str, set[str]]:
    """{variable: operators it is used with ('' for plain ${VAR})} in a compose file's text."""
    found: dict[str, set[str]] = {}
    for name, operator, _ in INTERPOLATION.findall(text):
        found.setdefault(name, set()).add(operator)
    return found


def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def ringserve_services(compose: dict) -> dict[str, dict]:
    """Services running the ringserve image, by the service they serve (`serve NAME`)."""
    found = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if command[:1] == ["serve"]:
            found[name] = service
    return found


# ---------------------------------------------------------------------------------- schema
def test_compose_file_matches_the_compose_spec_schema():
    validator = jsonschema.Draft202012Validator(compose_schema())
    compose = load_compose()
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # After the ${...} substitution compose performs with the values of .env.example.
    resolved = interpolate(compose, env_example())
    assert [e.message for e in validator.iter_errors(resolved)] == []


def test_schema_check_rejects_a_broken_service():
    """The schema is a real check: a misspelt key fails it."""
    compose = load_compose()
    compose["services"]["fusion"]["healthcheck"] = {"tset": ["CMD", "true"]}
    compose["services"]["kvstore"]["restrat"] = "always"
    validator = jsonschema.Draft202012Validator(compose_schema())
    messages = " ".join(e.message for e in validator.iter_errors(compose))
    assert "'restrat' was unexpected" in messages and "'tset'" in messages


# ---------------------------------------------------------------------------------- variables
def test_every_referenced_variable_is_in_env_example_and_back():
    used = referenced_variables(COMPOSE.read_text())
    defined = env_example()
    assert sorted(set(used) - set(defined)) == []
    assert sorted(set(defined) - set(used)) == [], "stale variables in .env.example"


def test_secrets_are_required_and_placeholders_are_obviously_fake():
    used = referenced_variables(COMPOSE.read_text())
    secrets = [name for name in used if "PASSWORD" in name]
    assert len(secrets) >= 4
    for name in secrets:
        assert used[name] == {":?"}, f"{name} must fail fast when unset (${{{name}:?...}})"
        assert env_example()[name].startswith("change-me"), name
    assert ".env" in DOCKERIGNORE.read_text().split()


def test_ringserve_environment_names_settings_fields():
    """A misspelt RINGSERVE_* variable would be ignored silently by Settings (extra=ignore)."""
    fields = set(Settings.model_fields)
    for name, service in ringserve_services(load_compose()).items():
        for key in service["environment"]:
            if key.startswith("RINGSERVE_"):
                assert key.removeprefix("RINGSERVE_").lower() in fields, f"{name}: {key}"


def test_services_reach_redis_and_nats_with_their_passwords():
    compose = interpolate(load_compose(), env_example())
    env = env_example()
    redis_command = compose["services"]["redis"]["command"]
    assert redis_command[redis_command.index("--requirepass") + 1] == env["REDIS_PASSWORD"]
    for name, service in ringserve_services(compose).items():
        environment = service["environment"]
        settings = Settings(**{k.removeprefix("RINGSERVE_").lower(): v for k, v in environment.items()
                               if k.startswith("RINGSERVE_")})
        assert settings.redis_urls == [f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"], name
        assert settings.nats_url == "nats://nats:4222"
        assert (settings.nats_user, settings.nats_password) == ("ringserve", env["NATS_SERVICE_PASSWORD"])


# ---------------------------------------------------------------------------------- services
def test_every_service_has_a_healthcheck():
    for name, service in load_compose()["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_the_five_services_run_from_the_one_image():
    compose = load_compose()
    served = {}
    for name, service in ringserve_services(compose).items():
        target = service["command"][1]
        served.setdefault(target, []).append(name)
        assert service["healthcheck"]["test"] == ["CMD", "ringserve", "health", target], name
        assert service["build"]["context"] == "."
        assert (ROOT / service["build"]["dockerfile"]) == DOCKERFILE
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert sorted(served) == sorted(RINGSERVE_SERVICES)
    assert served["worker"] == ["worker", "worker-gpu"]


def test_the_gateway_listens_on_every_interface_in_its_container_and_loopback_on_the_host():
    compose = interpolate(load_compose(), env_example())
    gateway = compose["services"]["gateway"]
    environment = gateway["environment"]
    settings = Settings(**{k.removeprefix("RINGSERVE_").lower(): v for k, v in environment.items()
                           if k.startswith("RINGSERVE_")})
    assert settings.http_host == "0.0.0.0" and settings.api_keys == ""
    assert gateway["ports"] == [f"127.0.0.1:{settings.http_port}:{settings.http_port}"]
    # Prometheus scrapes its /metrics on the HTTP port
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "gateway"]
    assert job["static_configs"][0]["targets"] == [f"gateway:{settings.http_port}"]


def test_workers_scale_and_the_gpu_profile_reserves_nvidia_devices():
    services = load_compose()["services"]
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert "replicas" in worker["deploy"]
        # Fixed names or host ports would stop `--scale worker=N`.
        assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert "profiles" not in services["worker"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["RINGSERVE_DEVICE"] == "cuda"
    assert gpu["image"] != services["worker"]["image"]
    assert "TORCH_INDEX" in gpu["build"]["args"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == 1  # one GPU per worker: NCCL refuses two ranks on one device


def test_only_workers_set_their_device_gpu_workers_to_cuda():
    """The scheduler picks the world's backend from the devices workers report in their heartbeats
    (NCCL for CUDA workers), so RINGSERVE_DEVICE is a worker setting: cuda on the GPU workers, the
    CPU default elsewhere, and never on the scheduler, whose own device would decide nothing."""
    compose = interpolate(load_compose(), env_example())
    services = ringserve_services(compose)

    def device(name: str) -> str:
        environment = services[name]["environment"]
        return Settings(**{k.removeprefix("RINGSERVE_").lower(): v for k, v in environment.items()
                           if k.startswith("RINGSERVE_")}).device

    assert device("worker-gpu") == "cuda"
    assert "gpu" in services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    assert "cuda" in services["worker-gpu"]["image"]
    assert re.search(r"/cu\d+$", services["worker-gpu"]["build"]["args"]["TORCH_INDEX"])  # CUDA torch wheels
    assert device("worker") == "cpu"
    for name in ("scheduler", "kvstore", "fusion"):
        assert "RINGSERVE_DEVICE" not in services[name]["environment"], name


def test_depends_on_and_mounted_files_exist():
    services = load_compose()["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./infra"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_host_ports_bind_to_loopback_only():
    for name, service in load_compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_traces_go_to_a_service_that_receives_otlp():
    compose = load_compose()
    services = compose["services"]
    for name, service in ringserve_services(compose).items():
        environment = service["environment"]
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", environment["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
        assert environment["OTEL_EXPORTER_OTLP_PROTOCOL"] == ("grpc" if port == "4317" else "http/protobuf")
        assert port in services[host]["expose"], f"{name} exports to {host}:{port}"


# ---------------------------------------------------------------------------------- image
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_builds_the_one_image():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = {value.split("=")[0] for op, value in instructions if op == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX"} <= args
    runs = [value for op, value in instructions if op == "RUN"]
    torch_install = next(run for run in runs if "TORCH_SPEC" in run)
    assert '--index-url "${TORCH_INDEX}"' in torch_install
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs)
    (user,) = [value for op, value in instructions if op == "USER"]
    assert user not in ("root", "0")
    (entrypoint,) = [value for op, value in instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["ringserve-entrypoint"]
    assert ENTRYPOINT.read_text().rstrip().endswith('exec ringserve "$@"')


def dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: the last matching line wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("**/")
        parts = Path(path).parts
        if any(Path(*parts[: i + 1]).match(pattern) for i in range(len(parts))) or Path(path).match(pattern):
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert dockerignored(".env", patterns) and dockerignored(".git", patterns) and dockerignored(".venv", patterns)
    assert not dockerignored(".env.example", patterns)
    copies = [value for op, value in dockerfile_instructions() if op == "COPY"]
    assert copies
    for value in copies:
        sources = value.split()[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def run_entrypoint(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """Run infra/entrypoint.sh with a stand-in `ringserve` that prints what it received."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ringserve"
    fake.write_text('#!/bin/sh\necho "$RINGSERVE_ADVERTISE_HOST"\necho "$@"\n')
    fake.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    result = subprocess.run(["sh", str(ENTRYPOINT), "serve", "worker"], env={**env, "PATH": path},
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.splitlines()


def test_entrypoint_advertises_the_container_address_unless_told(tmp_path):
    own_address = socket.gethostbyname(socket.gethostname())
    assert run_entrypoint(tmp_path, {}) == [own_address, "serve worker"]
    assert run_entrypoint(tmp_path, {"RINGSERVE_ADVERTISE_HOST": "worker-0.worker"}) == ["worker-0.worker", "serve worker"]


# ---------------------------------------------------------------------------------- NATS
def nats_server_binary() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if os.access(p, os.X_OK)), None)


requires_nats_server = pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed")


def nats_conf_variables(conf_text: str) -> set[str]:
    """The $VARIABLES a nats.conf reads (outside comments)."""
    code = "\n".join(line.split("#", 1)[0] for line in conf_text.splitlines())
    return set(re.findall(r"\$([A-Z_]+)", code))


def nats_conf_check(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`nats-server -t`: parse the configuration (variables resolved from env) and exit."""
    return subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], env=env,
                          capture_output=True, text=True, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_nats_server
def test_nats_conf_is_valid_with_the_env_passwords():
    env = env_example()
    ok = nats_conf_check(NATS_CONF, env)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    missing = nats_conf_check(NATS_CONF, {})
    assert missing.returncode != 0 and "NATS_SERVICE_PASSWORD" in missing.stderr + missing.stdout
    # The compose service gets the variables the file reads and mounts it where its command looks.
    nats_service = interpolate(load_compose(), env)["services"]["nats"]
    assert nats_conf_variables(NATS_CONF.read_text()) <= set(nats_service["environment"])
    assert f"./infra/nats/nats.conf:{nats_service['command'][-1]}:ro" in nats_service["volumes"]


def test_nats_payload_limit_admits_the_largest_request():
    (limit,) = re.findall(r"^max_payload:\s*(\d+)MB$", NATS_CONF.read_text(), re.M)
    assert int(limit) * 1024 * 1024 >= Settings.model_fields["max_request_bytes"].default


@pytest.fixture
def compose_nats(tmp_path):
    """nats-server running infra/nats/nats.conf on free ports (store in tmp); yields (url, env)."""
    env = env_example()
    conf = tmp_path / "nats.conf"
    conf.write_text(re.sub(r"store_dir: .*", f"store_dir: {tmp_path / 'js'}", NATS_CONF.read_text()))
    port = free_port()
    process = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port),
                                "-m", str(free_port())], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}", env
    process.terminate()
    process.wait(timeout=10)


@requires_nats_server
async def test_nats_users_service_has_full_rights_client_only_the_public_api(compose_nats):
    url, env = compose_nats
    service = await nats.connect(url, user="ringserve", password=env["NATS_SERVICE_PASSWORD"])
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    client = await nats.connect(url, user="client", password=env["NATS_CLIENT_PASSWORD"], error_cb=on_error)
    try:
        # The service user answers on the public API and uses internal subjects and JetStream.
        async def answer(msg):
            await msg.respond(b"pong:" + msg.data)

        await service.subscribe(subjects.GENERATE, cb=answer)
        internal = await service.subscribe(subjects.heartbeat("worker", "w1"))
        await service.publish(subjects.heartbeat("worker", "w1"), b"beat")
        assert (await internal.next_msg(timeout=2)).data == b"beat"
        await service.jetstream().account_info()

        # The client user gets replies to its requests ...
        reply = await client.request(subjects.GENERATE, b"ping", timeout=2)
        assert reply.data == b"pong:ping"
        # ... but may not publish on internal subjects nor listen to them.
        await client.publish(subjects.heartbeat("worker", "spoofed"), b"x")
        await client.subscribe("ringserve.>")
        await client.flush()
        await service.flush()
        deadline = time.monotonic() + 2
        while len(errors) < 2 and time.monotonic() < deadline:
            await client.flush()
        violations = " ".join(str(e).lower() for e in errors)
        assert "permissions violation for publish" in violations
        assert "permissions violation for subscription" in violations
        with pytest.raises(Exception):
            await internal.next_msg(timeout=0.5)  # the spoofed heartbeat never arrived
        with pytest.raises(Exception):  # denied publish on $JS.API: no answer
            await client.jetstream(timeout=0.5).account_info()
    finally:
        await client.close()
        await service.close()


@requires_nats_server
async def test_nats_refuses_a_wrong_password(compose_nats):
    url, _ = compose_nats
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(url, user="client", password="wrong", allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)


# ---------------------------------------------------------------------------------- Prometheus
def test_prometheus_scrapes_every_ringserve_service_on_its_metrics_port():
    compose = load_compose()
    services = compose["services"]
    config = yaml.safe_load(PROMETHEUS.read_text())
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped[host] = int(port)
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            for host in dns["names"]:
                scraped[host] = int(dns["port"])
    ringserve = ringserve_services(compose)
    assert set(ringserve) <= set(scraped)
    for host, port in scraped.items():
        if host == "localhost":
            continue
        assert host in services, f"Prometheus scrapes unknown service {host}"
        if host in ringserve:
            environment = ringserve[host]["environment"]
            # the gateway serves its metrics on its HTTP port (GET /metrics), the others on their own
            metrics_port = environment.get("RINGSERVE_HTTP_PORT", environment["RINGSERVE_METRICS_PORT"])
            assert int(metrics_port) == port, host
            published = [p.rsplit(":", 1)[-1] for p in ringserve[host].get("ports", [])]
            assert str(port) in ringserve[host]["expose"] + published
    # Scaled workers have no fixed name: they are found through DNS, never a static target.
    static_hosts = {t.rsplit(":", 1)[0] for job in config["scrape_configs"]
                    for s in job.get("static_configs", []) for t in s["targets"]}
    assert "worker" not in static_hosts
    assert "./infra/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_the_services_refuse_the_example_passwords(tmp_path):
    fake = tmp_path / "ringserve"  # stands in for the CLI the entrypoint hands over to
    fake.write_text("#!/bin/sh\necho started \"$@\"\n")
    fake.chmod(0o755)
    entrypoint = Path(__file__).resolve().parents[2] / "infra" / "entrypoint.sh"
    base = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RINGSERVE_ADVERTISE_HOST": "10.0.0.5"}
    examples = [line.split("=", 1)[1] for line in (entrypoint.parents[1] / ".env.example").read_text().splitlines()
                if line.startswith(("NATS_SERVICE_PASSWORD=", "REDIS_PASSWORD="))]
    assert len(examples) == 2 and all("change-me" in e for e in examples)
    for env in ({"RINGSERVE_NATS_PASSWORD": examples[0]},
                {"RINGSERVE_REDIS_URL": f"redis://:{examples[1]}@redis:6379/0"}):
        refused = subprocess.run(["sh", str(entrypoint), "serve", "worker"], env={**base, **env},
                                 capture_output=True, text=True, timeout=10)
        assert refused.returncode == 64 and "example passwords" in refused.stderr, refused
    ok = subprocess.run(["sh", str(entrypoint), "serve", "worker"], timeout=10, capture_output=True, text=True,
                        env={**base, "RINGSERVE_NATS_PASSWORD": "s3cret", "RINGSERVE_REDIS_URL": "redis://:pw@redis:6379/0"})
    assert ok.returncode == 0 and ok.stdout.strip() == "started serve worker", ok
