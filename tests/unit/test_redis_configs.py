"""The shipped Redis configs (docker-compose.yml, infra/k8s/30-redis.yaml) against the rule the
kvstore derives its default KV budget by (services/kvstore/derived_budget.py)."""

from __future__ import annotations

import yaml

from tests.unit.test_compose import ROOT, env_example, interpolate, load_compose

REDIS_K8S = ROOT / "infra" / "k8s" / "30-redis.yaml"
# Redis's size units (1gb = 1024**3 bytes, as redis.conf says) and Kubernetes's binary ones.
REDIS_UNITS = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
K8S_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _size(text: str, units: dict[str, int]) -> int:
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text.removesuffix(suffix)) * factor
    return int(text)


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_redis_configs_follow_the_kv_budget_rule():
    """The kvstore's default budget is a fraction of Redis's maxmemory, else of the memory Redis
    reports for its host. Compose: no maxmemory and no container limit, so the host's memory is
    right. Kubernetes: the container has a limit, which Redis does not report, so maxmemory is set
    below it. Both let Redis drop only keys with a TTL (block bytes), never the index."""
    compose_redis = interpolate(load_compose(), env_example())["services"]["redis"]
    assert _flag(compose_redis["command"], "--maxmemory") is None
    assert "mem_limit" not in compose_redis and "deploy" not in compose_redis
    assert _flag(compose_redis["command"], "--maxmemory-policy") == "volatile-lru"

    deployment = next(d for d in yaml.safe_load_all(REDIS_K8S.read_text()) if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    maxmemory = _size(_flag(container["args"], "--maxmemory"), REDIS_UNITS)
    limit = _size(container["resources"]["limits"]["memory"], K8S_UNITS)
    assert 0 < maxmemory < limit
    assert _flag(container["args"], "--maxmemory-policy") == "volatile-lru"
