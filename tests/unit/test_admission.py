"""Admission without NATS: the wait queue puts a short prompt before a long one that came first,
a request first in the order holds back those behind it, refusals come at once, and the queue
shows in status, in the `scheduler.queue` span and in the `request_dequeued` log event."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from services.scheduler.admission import Admission
from services.scheduler.api import ApiError
from services.scheduler.registry import Registry
from shared.messages import ErrorCode, GenerateRequest, KVQuant, ModelInfo, WorkerHeartbeat
from shared.settings import Settings

MODEL = ModelInfo(name="demo", vocab_size=300, num_layers=2, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=512, dtype="float32")
CAPACITY = 100  # KV tokens of the one worker
# Aging too slow to matter within a test: the order is shortest first.
SLOW_AGING = Settings(admission_aging_tokens_per_s=1e-9)


def admission(settings: Settings = SLOW_AGING) -> tuple[Admission, InMemorySpanExporter]:
    registry = Registry(timeout_s=60.0)
    registry.on_worker(WorkerHeartbeat(worker_id="w0", device="cpu", model=MODEL, store_addr="w0:1",
                                       world_generation=0, world_rank=None, busy=False, active_requests=0,
                                       kv_tokens=0, kv_capacity_tokens=CAPACITY))
    registry.on_fusion("p0", draining=False)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Admission(settings, registry, provider.get_tracer("test")), exporter


def start(adm: Admission, request_id: str, prompt_tokens: int, max_new_tokens: int,
          cancelled=lambda: False) -> asyncio.Task:
    req = GenerateRequest(input_ids=[1] * prompt_tokens, max_new_tokens=max_new_tokens, request_id=request_id)
    return asyncio.create_task(adm.wait_for_placement(request_id, prompt_tokens, prompt_tokens, req, KVQuant.NONE,
                                                      cancelled))


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_short_prompt_is_placed_before_a_long_one_that_waited_longer():
    adm, spans = admission()
    waited: list[float] = []
    adm.on_dequeued = waited.append
    hold = await start(adm, "hold", 50, 40)  # 90 of 100 KV tokens: neither below fits beside it
    assert hold.workers == ["w0"]
    with capture_logs() as logs:
        long = start(adm, "long", 60, 30)
        await until(lambda: adm.waiting == 1)
        short = start(adm, "short", 5, 10)
        await until(lambda: adm.waiting == 2)
        assert [(q.request_id, q.place, q.prefill_tokens) for q in adm.queued()] == [("short", 1, 5), ("long", 2, 60)]
        adm.release("hold")
        assert (await asyncio.wait_for(short, 5)).workers == ["w0"]
        # 15 + 90 tokens do not fit: the long one waits for the short one to end.
        await asyncio.sleep(0.2)
        assert not long.done() and [q.request_id for q in adm.queued()] == ["long"]
        adm.release("short")
        assert (await asyncio.wait_for(long, 5)).workers == ["w0"]
    assert adm.waiting == 0
    dequeued = [e for e in logs if e["event"] == "request_dequeued"]
    assert [(e["prefill_tokens"], e["place"], e["overtaken_by"]) for e in dequeued] == [(5, 1, 0), (60, 1, 1)]
    queue_spans = {s.attributes["request_id"]: s.attributes for s in spans.get_finished_spans()
                   if s.name == "scheduler.queue"}
    assert queue_spans["short"]["queue.place"] == 1 and queue_spans["long"]["queue.overtaken_by"] == 1
    assert queue_spans["long"]["queue.waited_s"] > 0
    # and the queue-time metric got each placed waiter's wait
    assert len(waited) == 2 and waited[1] >= waited[0] > 0


async def test_the_first_in_order_holds_back_those_behind_it():
    adm, _ = admission()
    await start(adm, "hold", 50, 40)  # 90 of 100: 10 free
    first = start(adm, "first", 5, 20)  # 25 tokens: waits
    await until(lambda: adm.waiting == 1)
    # 9 tokens would fit, but its longer prefill puts it behind `first`: room that frees must
    # go to the first in order (how aging brings a long prompt through), so it waits too.
    second = start(adm, "second", 8, 1)
    await until(lambda: adm.waiting == 2)
    await asyncio.sleep(0.2)
    assert not first.done() and not second.done()
    adm.release("hold")
    await asyncio.wait_for(first, 5)
    await asyncio.wait_for(second, 5)
    assert adm.waiting == 0


async def test_refusals_come_at_once_even_behind_a_queue():
    adm, _ = admission()
    await start(adm, "hold", 50, 45)
    waiting = start(adm, "waiting", 30, 10)
    await until(lambda: adm.waiting == 1)
    with pytest.raises(ApiError) as info:
        await asyncio.wait_for(start(adm, "huge", 90, 20), 1)  # 110 > any worker's capacity
    assert info.value.code == ErrorCode.TOO_LONG
    waiting.cancel()


async def test_a_cancel_ends_the_wait_and_leaves_the_queue():
    adm, spans = admission()
    await start(adm, "hold", 50, 45)
    cancelled = False
    waiting = start(adm, "waiting", 30, 10, cancelled=lambda: cancelled)
    await until(lambda: adm.waiting == 1)
    cancelled = True
    assert await asyncio.wait_for(waiting, 5) is None
    assert adm.waiting == 0 and adm.queued() == []
    assert [s.attributes.get("cancelled") for s in spans.get_finished_spans() if s.name == "scheduler.queue"] == [True]


async def test_past_max_queued_requests_a_request_is_overloaded():
    adm, _ = admission(Settings(admission_aging_tokens_per_s=1e-9, max_queued_requests=1))
    await start(adm, "hold", 50, 45)
    waiting = start(adm, "waiting", 30, 10)
    await until(lambda: adm.waiting == 1)
    with pytest.raises(ApiError) as info:
        await asyncio.wait_for(start(adm, "one-too-many", 3, 3), 1)
    assert info.value.code == ErrorCode.OVERLOADED
    assert [q.request_id for q in adm.queued()] == ["waiting"]
    waiting.cancel()
