"""The OpenAI-compatible gateway end to end: the official `openai` client against the gateway
process of a real stack (scheduler, fusion, one demo-model worker), beside the NATS API."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from shared.client import RingserveClient
from shared.settings import Settings
from tests.integration.stack import Stack, free_port, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

API_KEY = "test-key-1"
PROMPT = "Hello, ringserve"
MAX_TOKENS = 8
# Long enough that a stream is still decoding when its client goes away.
LONG_MAX_TOKENS = 3000
CANCEL_WAIT_S = 20.0


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory):
    port = free_port()
    stack = Stack(tmp_path_factory.mktemp("gateway"), workers=1, services=("fusion", "scheduler", "gateway"),
                  env={"RINGSERVE_HTTP_PORT": str(port), "RINGSERVE_API_KEYS": f"other-key,{API_KEY}"})
    try:
        asyncio.run(stack.wait_ready(1))
        wait_port(port)
        stack.http_url = f"http://127.0.0.1:{port}"
        yield stack
    finally:
        codes = stack.stop()
        assert all(code == 0 for code in codes.values()), f"unclean exit {codes}\n{stack.logs()}"


@pytest.fixture
async def client(gateway_stack):
    async with openai.AsyncOpenAI(base_url=gateway_stack.http_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


async def test_models_list_names_the_served_model(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo"]


async def test_greedy_completion_equals_the_nats_api_and_reports_usage(client, gateway_stack):
    completion = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    settings = Settings(nats_url=gateway_stack.servers.nats_url)
    async with await RingserveClient.connect(settings) as nats_client:
        reply = await nats_client.generate({"prompt": PROMPT, "max_new_tokens": MAX_TOKENS})
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == reply.text
    assert completion.choices[0].finish_reason == reply.finish_reason
    assert completion.usage.prompt_tokens == reply.usage.prompt_tokens
    assert completion.usage.completion_tokens == len(reply.output_ids)
    assert completion.usage.total_tokens == reply.usage.prompt_tokens + len(reply.output_ids)


async def test_streamed_chat_completion_with_usage(client):
    stream = await client.chat.completions.create(
        model="demo", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= MAX_TOKENS
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # the same request unstreamed says the same (greedy)
    whole = await client.chat.completions.create(
        model="demo", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0


async def test_a_bad_request_raises_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="demo", prompt=PROMPT, max_tokens=0)
    assert info.value.body["code"] == "invalid_request" and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="demo", prompt=PROMPT, n=2)
    assert info.value.body["code"] == "unsupported"
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="demo", prompt=PROMPT, extra_body={"no_such_field": 1})
    assert info.value.body["param"] == "no_such_field"
    # the scheduler's own refusal: a prompt over the model's limit
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="demo", prompt=PROMPT, max_tokens=10**6)
    assert info.value.status_code == 400


async def test_an_api_key_is_required(gateway_stack):
    async with openai.AsyncOpenAI(base_url=gateway_stack.http_url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    async with httpx.AsyncClient(base_url=gateway_stack.http_url) as http:
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/health")).json() == {"status": "ok"}  # probes need no key
        metrics = (await http.get("/metrics")).text
    assert 'ringserve_gateway_requests_total{endpoint="models",status="401"}' in metrics


def scheduler_events(stack: Stack, event: str, request_id: str) -> list[dict]:
    found = []
    for line in (stack.workdir / "scheduler.log").read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event and record.get("request_id") == request_id:
                found.append(record)
    return found


async def test_a_client_that_disconnects_mid_stream_cancels_its_request(client, gateway_stack):
    stream = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=LONG_MAX_TOKENS,
                                             temperature=0, stream=True)
    seen = 0
    async for chunk in stream:
        seen += 1
        if seen == 3:
            break
    request_id = chunk.id.removeprefix("cmpl-")
    await stream.close()  # the HTTP connection goes away mid-stream
    deadline = time.monotonic() + CANCEL_WAIT_S
    while not (done := scheduler_events(gateway_stack, "request_done", request_id)):
        assert time.monotonic() < deadline, gateway_stack.logs()
        await asyncio.sleep(0.1)
    assert done[0]["finish"] == "cancelled" and done[0]["tokens"] < LONG_MAX_TOKENS
    assert scheduler_events(gateway_stack, "request_cancelled", request_id)
