"""The compute core stays free of the services' plumbing: the worker's engine (and the pure
attention and position modules under it) import neither NATS nor Redis, so they run and are
tested without either (issue 15: the engine once reached them through the prefix cache)."""

import subprocess
import sys

import pytest

PLUMBING = ("nats", "redis", "shared.bus", "shared.kv.store", "services.worker.prefix")


@pytest.mark.parametrize("module", ["services.worker.engine", "shared.attention.ring", "shared.positions"])
def test_compute_modules_import_no_bus_or_store(module):
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{'nats', 'redis'}} "
            f"or m in {PLUMBING!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} pulls in {out.strip()}"
