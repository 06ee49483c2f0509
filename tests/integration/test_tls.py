"""NATS over TLS with the settings every connection uses (shared/bus.py: nats_auth_options): a
server with a certificate from a private CA is reached with that CA and refused without it."""

import shutil
import subprocess
from pathlib import Path

import pytest

from shared.bus import connect
from shared.client import RingserveClient, RingserveError
from shared.settings import Settings
from tests.integration.stack import find_binary, free_port, wait_port

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")]


def make_certificates(d: Path) -> None:
    """A CA, and a server certificate it signs for 127.0.0.1."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=ringserve-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext")


@pytest.fixture
def tls_nats(tmp_path):
    make_certificates(tmp_path)
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'port: {port}\nnet: 127.0.0.1\ntls {{\n  cert_file: "{tmp_path / "server.pem"}"\n'
                    f'  key_file: "{tmp_path / "server.key"}"\n}}\n')
    proc = subprocess.Popen([find_binary("nats-server"), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    yield f"tls://127.0.0.1:{port}", tmp_path / "ca.pem"
    proc.terminate()
    proc.wait(10)


async def test_nats_over_tls_with_the_ca_and_refused_without(tls_nats):
    url, ca = tls_nats
    settings = Settings(nats_url=url, nats_tls_ca_file=str(ca))
    service = await connect(settings, "tls-test")
    try:
        async def answer(msg):
            await msg.respond(b"over tls")

        await service.subscribe("tls.echo", cb=answer)
        await service.flush()
        async with await RingserveClient.connect(settings) as client:
            assert (await client.nc.request("tls.echo", b"?", timeout=5)).data == b"over tls"
    finally:
        await service.close()
    with pytest.raises(RingserveError, match="unavailable"):  # the server's CA unknown: no connection
        await RingserveClient.connect(Settings(nats_url=url))
