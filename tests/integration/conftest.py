import pytest

from tests.integration.stack import Servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Private nats-server and redis-server: tests never disturb (or depend on) a developer's stack."""
    s = Servers(tmp_path_factory.mktemp("servers"))
    yield s
    s.stop()
