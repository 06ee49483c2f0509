"""Chunked prefill through the services, one CPU worker: a long prompt's prefill leaves room for
another request's decode between its chunks, and its tokens are still transformers' tokens."""

import asyncio
import json
import time

import nats
import pytest
import torch

from shared import subjects
from tests.helpers.checkpoints import save_tiny_checkpoint, tiny_dims
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
STEP = 64  # RINGSERVE_PREFILL_STEP_TOKENS
LONG_PROMPT = 3000
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.LlamaConfig(**tiny_dims(max_position_embeddings=4096))  # no eos: runs to its length
    path = tmp_path_factory.mktemp("tiny-llama-chunked")
    return path, save_tiny_checkpoint(cfg, path, seed=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoint):
    path, _ = checkpoint
    s = Stack(tmp_path_factory.mktemp("chunked"), workers=1,
              env={"RINGSERVE_MODEL": str(path), "RINGSERVE_PREFILL_STEP_TOKENS": str(STEP),
                   "RINGSERVE_KV_STORE_ENABLED": "false"})
    try:
        asyncio.run(s.wait_ready(1))
        yield s
    finally:
        s.stop()


async def test_chunked_prefill_tokens_equal_transformers(stack, checkpoint):
    _, model = checkpoint
    ids = [(i * 37 + 5) % 297 + 3 for i in range(5 * STEP + 9)]  # 6 chunks, the last partial
    reply = await stack.generate({"input_ids": ids, "max_new_tokens": NEW_TOKENS})
    assert "error" not in reply, f"{reply}\n{stack.logs()}"
    expected = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert reply["output_ids"] == expected[0, len(ids):].tolist()


async def test_a_long_prefill_lets_another_request_decode_between_its_chunks(stack):
    nc = await nats.connect(stack.servers.nats_url)
    try:
        token_times: list[float] = []
        inbox = nc.new_inbox()
        first_event = asyncio.Event()

        async def on_short(msg):
            event = json.loads(msg.data)
            if event.get("type") == "token":
                token_times.append(time.monotonic())
                first_event.set()

        await nc.subscribe(inbox, cb=on_short)
        await nc.publish(subjects.GENERATE, json.dumps({"input_ids": [7, 8, 9], "max_new_tokens": 3000,
                                                        "stream": True}).encode(), reply=inbox)
        await asyncio.wait_for(first_event.wait(), 60)

        sent = time.monotonic()
        long = await stack.generate({"input_ids": [(i * 13 + 1) % 297 + 3 for i in range(LONG_PROMPT)],
                                     "max_new_tokens": 1})
        assert "error" not in long, long
        ttft_s = long["timings"]["ttft_ms"] / 1000
        during = [t for t in token_times if sent < t < sent + ttft_s]
        # one-pass, the short request's steps would queue behind the whole prefill: no token then
        assert len(during) >= 3, f"{len(during)} tokens during a {ttft_s:.2f} s prefill\n{stack.logs()}"
    finally:
        await nc.close()
