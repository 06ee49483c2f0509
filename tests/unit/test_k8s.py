"""infra/k8s validated against the Kubernetes JSON schemas (strict: unknown fields fail) shipped by
kubernetes-validate, then cross-checked: selectors, references, the NATS cluster routes, GPUs."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shared.settings import Settings
from tests.unit.test_compose import NATS_CONF, nats_conf_check, nats_conf_variables, requires_nats_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
# The oldest Kubernetes release the manifests must apply to.
KUBERNETES_VERSION = "1.30"
NAMESPACE = "ringserve"
RINGSERVE_SERVICES = ("scheduler", "kvstore", "fusion", "worker", "gateway")
GATEWAY = "gateway"
HTTP_PORT = 8000
METRICS_PORT = 9464
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Folders applied on purpose only: the Secret example and the Prometheus Operator ServiceMonitor.
EXAMPLE_FOLDERS = ("secrets", "monitoring")


def load(paths) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def applied() -> list[dict]:
    """What `kubectl apply -f infra/k8s/` applies, plus the Secret it expects to exist (read-only)."""
    return load(sorted(K8S.glob("*.yaml"))) + load(sorted((K8S / "secrets").glob("*.yaml")))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = find(docs, kind, name)
    return doc


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def ids(docs: list[dict]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


# ---------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("doc", applied(), ids=ids(applied()))
def test_manifest_matches_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_check_rejects_unknown_and_mistyped_fields():
    worker = one(applied(), "StatefulSet", "worker")
    misspelt = copy.deepcopy(worker)
    misspelt["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    mistyped = copy.deepcopy(worker)
    containers(mistyped)[0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mistyped, KUBERNETES_VERSION, strict=True)


def test_example_folders_are_not_applied_by_default():
    top_level = {d["kind"] for d in load(sorted(K8S.glob("*.yaml")))}
    assert "Secret" not in top_level and "ServiceMonitor" not in top_level
    for folder in EXAMPLE_FOLDERS:
        assert list((K8S / folder).glob("*.yaml")), folder


# ---------------------------------------------------------------------------------- wiring
def test_everything_lives_in_the_namespace():
    docs = applied()
    (namespace,) = find(docs, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    # kubectl applies a folder in file name order: the namespace comes first.
    assert sorted(K8S.glob("*.yaml"))[0].name.startswith("00-")
    for doc in docs + load((K8S / "monitoring").glob("*.yaml")):
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


def test_selectors_match_their_pods_and_services_find_them():
    docs = applied()
    pod_labels = []
    for workload in workloads(docs):
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
        pod_labels.append((labels, workload))
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        matched = [w for labels, w in pod_labels if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} workloads"
        port_names = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port['targetPort']}"


def test_config_and_secret_references_resolve():
    docs = applied()
    config_maps = {d["metadata"]["name"]: d["data"] for d in find(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in find(docs, "Secret")}
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], f"{name}: {env['name']}"
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config_maps[ref["configMapKeyRef"]["name"]], name


def test_dependent_variables_are_defined_before_use():
    """Kubernetes expands $(VAR) only from variables defined earlier in the same list."""
    for workload in workloads(applied()):
        for container in containers(workload):
            defined: set[str] = set()
            for env in container.get("env", []):
                for used in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                    assert used in defined, f"{workload['metadata']['name']}: {env['name']} uses $({used})"
                defined.add(env["name"])
            for arg in container.get("args", []):
                for used in re.findall(r"\$\((\w+)\)", arg):
                    assert used in defined, f"{workload['metadata']['name']}: args use $({used})"


def test_configmap_names_settings_fields():
    """A misspelt RINGSERVE_* key would be ignored silently by Settings (extra=ignore)."""
    docs = applied()
    keys = list(one(docs, "ConfigMap", "ringserve-config")["data"])
    for workload in workloads(docs):
        keys += [e["name"] for c in containers(workload) for e in c.get("env", [])]
    ringserve_keys = {k for k in keys if k.startswith("RINGSERVE_")}
    assert ringserve_keys
    for key in ringserve_keys:
        assert key.removeprefix("RINGSERVE_").lower() in Settings.model_fields, key


# ---------------------------------------------------------------------------------- ringserve
def test_ringserve_services_serve_health_and_metrics():
    docs = applied()
    config = one(docs, "ConfigMap", "ringserve-config")["data"]
    assert int(config["RINGSERVE_METRICS_PORT"]) == METRICS_PORT
    served = set()
    for workload in workloads(docs):
        for container in containers(workload):
            if container.get("args", [])[:1] != ["serve"]:
                continue
            name = container["args"][1]
            served.add(name)
            if name == GATEWAY:
                continue  # probed over HTTP (test_the_gateway_is_probed_and_scraped_over_http)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["exec"]["command"] == ["ringserve", "health", name], f"{name} {probe}"
            assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
            assert container["image"].startswith("ringserve:")
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            # The metrics port has a Service for Prometheus to find.
            assert one(docs, "Service", name)["spec"]["ports"][0]["targetPort"] == "metrics"
    assert served == set(RINGSERVE_SERVICES)
    for name in ("scheduler", "kvstore", "fusion", GATEWAY):
        one(docs, "Deployment", name)


def test_the_gateway_is_probed_and_scraped_over_http():
    docs = applied()
    gateway = one(docs, "Deployment", GATEWAY)
    (container,) = containers(gateway)
    assert {"name": "http", "containerPort": HTTP_PORT} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    env = {e["name"]: e for e in container["env"]}
    settings = Settings(http_host=env["RINGSERVE_HTTP_HOST"]["value"], http_port=env["RINGSERVE_HTTP_PORT"]["value"])
    assert settings.http_host == "0.0.0.0" and settings.http_port == HTTP_PORT
    assert env["RINGSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(HTTP_PORT) and annotations["prometheus.io/path"] == "/metrics"
    assert one(docs, "Service", GATEWAY)["spec"]["ports"][0]["targetPort"] == "http"


def test_workers_get_a_gpu_each_and_a_stable_name_through_a_headless_service():
    docs = applied()
    worker = one(docs, "StatefulSet", "worker")
    (container,) = containers(worker)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")  # the CUDA build of the image
    env = {e["name"]: e for e in container["env"]}
    assert env["RINGSERVE_DEVICE"]["value"] == "cuda"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    governing = one(docs, "Service", worker["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["publishNotReadyAddresses"] is True  # peers rendezvous before readiness
    expected = f"$(POD_NAME).{governing['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert env["RINGSERVE_ADVERTISE_HOST"]["value"] == expected


def test_only_gpu_workers_set_the_device():
    """The scheduler picks the world's backend (NCCL for CUDA workers) from the devices workers report
    in their heartbeats: RINGSERVE_DEVICE belongs on the GPU workers alone, not in the shared
    ConfigMap and not on the scheduler, whose own device would decide nothing."""
    docs = applied()
    assert "RINGSERVE_DEVICE" not in one(docs, "ConfigMap", "ringserve-config")["data"]
    for workload in workloads(docs):
        for container in containers(workload):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if container.get("args", [])[:2] == ["serve", "worker"]:
                assert env["RINGSERVE_DEVICE"] == "cuda"
                assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            else:
                assert "RINGSERVE_DEVICE" not in env, workload["metadata"]["name"]
                assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})


def test_service_monitor_scrapes_the_ringserve_services():
    docs = applied()
    (monitor,) = load((K8S / "monitoring").glob("*.yaml"))
    assert monitor["kind"] == "ServiceMonitor"
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    assert expression["operator"] == "In"
    selected = [s for s in find(docs, "Service")
                if s["metadata"]["labels"].get(expression["key"]) in expression["values"]]
    assert sorted(s["metadata"]["name"] for s in selected) == sorted(RINGSERVE_SERVICES)
    endpoint_ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    for service in selected:  # every service is scraped on one of its ports, the gateway on http
        scraped = endpoint_ports & {p["name"] for p in service["spec"]["ports"]}
        assert scraped == ({"http"} if service["metadata"]["name"] == GATEWAY else {"metrics"})


# ---------------------------------------------------------------------------------- NATS
def nats_cluster_conf() -> str:
    return one(applied(), "ConfigMap", "nats-config")["data"]["nats.conf"]


def accounts_block(conf: str) -> list[str]:
    """The accounts { ... } section, comment-free and unindented, for comparison."""
    lines = [line.split("#", 1)[0].strip() for line in conf[conf.index("accounts {"):].splitlines()]
    return [line for line in lines if line]


def test_nats_runs_three_servers_routed_to_each_other():
    docs = applied()
    nats = one(docs, "StatefulSet", "nats")
    replicas = nats["spec"]["replicas"]
    assert replicas == 3
    headless = one(docs, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    cluster_port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "cluster")
    routes = re.findall(r"nats://(\S+)", nats_cluster_conf())
    expected = [f"nats-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{cluster_port}"
                for i in range(replicas)]
    assert routes == expected
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_nats_users_and_limits_match_compose():
    cluster = nats_cluster_conf()
    assert accounts_block(cluster) == accounts_block(NATS_CONF.read_text())
    limit = re.compile(r"^\s*max_payload:\s*(\S+)$", re.M)
    assert limit.findall(cluster) == limit.findall(NATS_CONF.read_text())


@requires_nats_server
def test_nats_cluster_conf_parses_with_the_pod_environment(tmp_path):
    nats = one(applied(), "StatefulSet", "nats")
    (container,) = containers(nats)
    pod_env = {e["name"]: "x" for e in container["env"]}
    assert nats_conf_variables(nats_cluster_conf()) <= set(pod_env)
    conf = tmp_path / "nats.conf"
    conf.write_text(nats_cluster_conf())
    result = nats_conf_check(conf, pod_env)
    assert result.returncode == 0, result.stderr + result.stdout
    # The ConfigMap is mounted where the container's arguments look for it.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"][-1] == f"{mount['mountPath']}/nats.conf"
