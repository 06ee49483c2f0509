"""Tenants kept apart by the project's own NATS config (infra/nats/nats.conf): each API tenant an
account importing the public API. Against a real scheduler and worker: a tenant reads only its
own replies, a reply subject naming another tenant's inbox stays in the sender's namespace, and
only the tenant that sent a request can cancel it."""

import asyncio
import json
import re
import subprocess
from pathlib import Path

import nats
import pytest

from shared import subjects
from tests.helpers.checkpoints import save_tiny_checkpoint, tiny_dims
from tests.integration.stack import Stack, find_binary, free_port, wait_port
from tests.unit.test_compose import NATS_CONF, env_example

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
LONG = 3000  # new tokens: no eos in the checkpoint, so alice's request runs until cancelled
TENANT_BLOCK = re.compile(r"# tenant-account-begin.*?\n(.*?)# tenant-account-end", re.S)


def two_tenant_config(workdir: Path) -> Path:
    """The shipped config, JetStream in workdir, and a second tenant added the documented way:
    a copy of the tenant block under another account, user and password variable."""
    text = NATS_CONF.read_text().replace("store_dir: /data", f"store_dir: {workdir / 'js'}")
    (block,) = TENANT_BLOCK.findall(text)
    second = block.replace("CLIENT {", "CLIENT2 {").replace("user: client", "user: client2").replace(
        "$NATS_CLIENT_PASSWORD", "$NATS_CLIENT2_PASSWORD")
    assert second != block
    text = text.replace("# tenant-account-end", "# tenant-account-end\n" + second)
    path = workdir / "nats.conf"
    path.write_text(text)
    return path


@pytest.fixture
def tenant_stack(tmp_path):
    env = {**env_example(), "NATS_CLIENT2_PASSWORD": "second-tenant-secret"}
    port = free_port()
    nats_proc = subprocess.Popen([find_binary("nats-server"), "-c", str(two_tenant_config(tmp_path)),
                                  "-a", "127.0.0.1", "-p", str(port), "-m", str(free_port())],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    url = f"nats://127.0.0.1:{port}"
    model = tmp_path / "tiny-llama"
    save_tiny_checkpoint(transformers.LlamaConfig(**tiny_dims(max_position_embeddings=4096)), model, seed=0)
    (tmp_path / "stack").mkdir()
    stack = Stack(tmp_path / "stack", workers=0, services=())
    stack.env.update(RINGSERVE_NATS_URL=url, RINGSERVE_NATS_USER="ringserve", RINGSERVE_MODEL=str(model),
                     RINGSERVE_NATS_PASSWORD=env["NATS_SERVICE_PASSWORD"])
    try:
        stack.start("scheduler")
        stack.start("worker", "worker0")
        yield url, env, stack
    finally:
        stack.stop()
        nats_proc.terminate()
        nats_proc.wait(10)


async def _ready(nc, stack, timeout=90.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            status = json.loads((await nc.request(subjects.STATUS, b"{}", timeout=2)).data)
            if len(status["workers"]) == 1:
                return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"stack not ready\n{stack.logs()}")


async def test_tenants_read_and_cancel_only_their_own_requests(tenant_stack):
    url, env, stack = tenant_stack
    alice = await nats.connect(url, user="client", password=env["NATS_CLIENT_PASSWORD"])
    bob = await nats.connect(url, user="client2", password="second-tenant-secret")
    try:
        await _ready(alice, stack)
        snooped: list[bytes] = []

        async def snoop(msg):
            snooped.append(msg.data)

        await bob.subscribe("_INBOX.>", cb=snoop)  # every inbox bob may see
        await bob.flush()

        # Alice streams a long request; its events reach her inbox only.
        inbox = alice.new_inbox()
        events: asyncio.Queue = asyncio.Queue()

        async def collect(msg):
            await events.put(json.loads(msg.data))

        await alice.subscribe(inbox, cb=collect)
        await alice.publish(subjects.GENERATE, json.dumps({"input_ids": [5, 6, 7], "max_new_tokens": LONG,
                                                           "stream": True}).encode(), reply=inbox)
        first = await asyncio.wait_for(events.get(), 60)
        request_id = first["request_id"]

        # Bob names Alice's inbox as his reply subject: his reply stays in his own namespace.
        bob_reply = json.loads((await bob.request(subjects.GENERATE, json.dumps(
            {"input_ids": [8, 9], "max_new_tokens": 2}).encode(), timeout=60)).data)
        assert "error" not in bob_reply, bob_reply
        await bob.publish(subjects.GENERATE, json.dumps({"input_ids": [10], "max_new_tokens": 2}).encode(),
                          reply=inbox)

        # Bob cannot cancel Alice's request ...
        refused = json.loads((await bob.request(subjects.CANCEL, json.dumps({"request_id": request_id}).encode(),
                                                timeout=10)).data)
        assert refused == {"request_id": request_id, "cancelled": False}, refused
        before = events.qsize()
        await asyncio.sleep(1.0)
        assert events.qsize() > before, "alice's request stopped after another tenant's cancel"
        # ... Alice can.
        done = json.loads((await alice.request(subjects.CANCEL, json.dumps({"request_id": request_id}).encode(),
                                               timeout=10)).data)
        assert done == {"request_id": request_id, "cancelled": True}, done

        seen = [e for e in list(events._queue) if e.get("request_id") not in (None, request_id)]  # noqa: SLF001
        assert seen == [], f"alice's inbox got another request's events: {seen}"
        # (bob's own cancel reply names alice's request; her stream's events never reach him)
        leaked = [e for e in map(json.loads, snooped) if e.get("request_id") == request_id and "type" in e]
        assert snooped and not leaked, f"bob read alice's reply: {leaked}"
    finally:
        await alice.close()
        await bob.close()
