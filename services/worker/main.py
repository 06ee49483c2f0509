"""The worker service: holds the model, joins the torch.distributed world, runs its share of
prefill and decode for the scheduler, and exchanges decode partials with the fusion service.

This module wires the parts and handles the world, release, abort and owner messages: one
prefill is prefill_path.py, the decode loop decode_loop.py, the model and pool loading.py.
All torch work runs in one compute thread (so heartbeats keep flowing during a long prefill).
KV store I/O: cached prompt blocks are loaded before a prefill is handed to the compute thread,
computed blocks are stored and the decode shard is copied to Redis in the background, after the
reply; their Redis traffic runs on an event loop of its own (io_loop.py), their kvstore
requests on this one.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import structlog
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import propagate

from shared import codec, subjects
from shared.kv.client import KVIndexClient
from shared.kv.shards import ShardStore
from shared.kv.store import KVBlockStore
from shared.messages import (
    AbortCommand,
    DecodePlan,
    DecodeStep,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    PrefillCommand,
    PrefillResult,
    ReleaseCommand,
    RingPlan,
    SamplingParams,
    ServiceHeartbeat,
    WorkerHeartbeat,
    WorldForm,
    WorldReady,
)
from shared.metrics import RingserveMetrics
from shared.errors import error_text
from shared.service import (ServiceApp, ServiceRuntime, drain_budget_s, main as service_main, serve,
                            wait_until)
from shared.settings import Settings
from services.worker.aborts import AbortFlags
from services.worker.batcher import DecodeBatcher
from services.worker.decode_loop import DecodeLoop
from services.worker.loading import load_engine
from services.worker.fusion_client import FusionClient
from services.worker.owners import OwnerWatch
from services.worker.prefill_path import PrefillPath
from services.worker.prefix import PrefixCache, block_masses
from services.worker.tier_use import tier_use
from services.worker.io_loop import IOLoop, IOLoopBlockStore, IOLoopShardStore
from services.worker.shard_persist import ShardPersister
from services.worker.world import World

log = structlog.get_logger("worker")


class WorkerApp(ServiceApp):
    name = "worker"
    description = "runs the model: ring-attention prefill and sequence-parallel decode"

    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        self.engine, self.model_info, self.kv_capacity = load_engine(settings)
        self.world = World(self.worker_id, settings.advertise_host, settings.dist_timeout_s)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.batcher = DecodeBatcher(settings.decode_max_batch)
        self.owners = OwnerWatch(settings.heartbeat_timeout_s)  # the schedulers of led requests
        self._ended_plans: dict[str, DecodePlan] = {}  # requests ended here, their owner not heard since
        self._busy = 0
        self._prefilling: dict[str, RingPlan] = {}  # request -> plan, from command to reply
        self._newest_world = 0
        self._background: set[asyncio.Task] = set()  # prefix stores, kept referenced until done
        # Prefills the scheduler told this worker to abort (set on the loop, read in the compute
        # thread); no prefill outlives the scheduler's request timeout, nor needs an abort longer.
        self.aborts = AbortFlags(ttl_s=settings.request_timeout_s * 2)

    # ------------------------------------------------------------------------------ wiring
    async def start(self, rt: ServiceRuntime) -> None:
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        sys.setswitchinterval(self.settings.worker_switch_interval_s)
        # asyncio.to_thread's pool: KV I/O (host copies, block encodes and decodes). A few threads
        # at most, so background stores queue instead of crowding the compute thread.
        self.loop.set_default_executor(ThreadPoolExecutor(max_workers=self.settings.kv_io_threads,
                                                          thread_name_prefix="kv-io"))
        self.tracer = rt.telemetry.tracer
        self.metrics = RingserveMetrics(rt.telemetry.meter)
        self.metrics.watch_queue("worker_decode", lambda: len(self.batcher.led) + len(self.batcher.followed))
        bus = rt.bus
        # Redis traffic of the KV store on a loop of its own, so it never delays a decode step
        self.kv_io = IOLoop(self.settings.kv_io_threads)
        self.prefix = PrefixCache(
            IOLoopBlockStore(KVBlockStore(self.settings, rt.telemetry.meter, hot_node=f"hot:{self.worker_id}"),
                             self.kv_io),
            KVIndexClient(bus, self.settings), self.settings,
            self.model_info.name, self.model_info.num_layers, self.engine.dtype, self.engine.device,
            self.engine.kv_reusable,
        )
        self.fusion = FusionClient(self.settings, self.worker_id,
                                   lambda rid: self.engine.requests[rid].plan.fusion_partition,
                                   lambda ms: self.metrics.record_ring_comm(ms, op="fusion"))
        persist = self.settings.kv_store_enabled and self.settings.kv_shard_persist
        self.shards = ShardPersister(IOLoopShardStore(ShardStore(self.settings), self.kv_io), self.settings.kv_block_tokens,
                                     budget=self.prefix.index) if persist else None
        self.decoding = DecodeLoop(self.engine, self.batcher, bus, self.settings, self.worker_id, self.tracer,
                                   self.metrics, self.fusion, self._run, self._keep, self._end_request, self.shards)
        self.prefills = PrefillPath(self.engine, self.prefix, self.world, self.aborts, self.settings, bus, self.tracer,
                                    self.metrics, self._run, self.loop)
        inbox = functools.partial(subjects.worker_inbox, self.worker_id)
        await serve(bus, inbox("prefill"), PrefillCommand, self._on_prefill, invalid=lambda text: PrefillResult(
            request_id="?", member=-1, ok=False, error_code=ErrorCode.INVALID_REQUEST, error=text))
        await serve(bus, inbox("decode"), DecodeStep, self._on_decode)
        await serve(bus, inbox("release"), ReleaseCommand, self._on_release)
        await serve(bus, inbox("abort"), AbortCommand, self._on_abort)
        await serve(bus, subjects.WORLD_FORM, WorldForm, self._on_world_form)
        # quiet: the scheduler's own registry logs bad heartbeats
        await serve(bus, subjects.heartbeats("scheduler"), ServiceHeartbeat, self._on_scheduler_heartbeat, quiet=True)
        self._decoder = asyncio.create_task(self.decoding.run())
        self._orphan_watch = asyncio.create_task(self._end_orphans())
        log.info("worker_ready", worker_id=self.worker_id, model=self.model_info.name, store=self.world.store_addr)

    def heartbeat(self, rt: ServiceRuntime) -> WorkerHeartbeat:
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            device=self.settings.device,
            model=self.model_info,
            store_addr=self.world.store_addr,
            world_generation=self.world.generation,
            world_rank=self.world.rank,
            busy=self._busy > 0,
            active_requests=len(self.engine.requests),
            kv_tokens=self.engine.kv_tokens,
            kv_capacity_tokens=self.kv_capacity,
            draining=rt.stopping.is_set(),
            # prefills in flight too: their decode will need the partition
            fusion_partitions=sorted({p.fusion_partition for p in [*(r.plan for r in list(self.engine.requests.values())),
                                                                    *list(self._prefilling.values())]
                                      if p.fusion == "bus" and p.size > 1}),  # rings of one merge nothing
            **tier_use(self.engine.resident),
        )

    async def stop(self, rt: ServiceRuntime) -> None:
        # Draining (heartbeats say so): no new request is placed here; the ones held (prefilling
        # or decoding) run to their end and are released by the scheduler, within the drain
        # budget, which leaves time for the cleanup below.
        def held() -> int:
            return len(self.engine.requests) + len(self._prefilling)

        if held():
            log.info("worker_draining", requests=held())
            if not await wait_until(lambda: not held(), drain_budget_s(self.settings)):
                log.warning("drain_timeout_requests_left", requests=sorted({*self.engine.requests, *self._prefilling}))
        self._decoder.cancel()
        self._orphan_watch.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.prefix.store.close()
        if self.shards is not None:
            await self.shards.close()
        await self.kv_io.close()
        await self.loop.run_in_executor(self.compute, self.world.close)
        await self.loop.run_in_executor(self.compute, self.fusion.close)
        self.compute.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args):
        self._busy += 1
        try:
            return await self.loop.run_in_executor(self.compute, fn, *args)
        finally:
            self._busy -= 1

    # ------------------------------------------------------------------------------ world
    async def _on_world_form(self, form: WorldForm, _msg: Msg) -> None:
        self._newest_world = max(self._newest_world, form.generation)

        def join() -> bool:
            # Forms queue behind compute work; joining an old generation after a newer one was
            # announced would leave this worker out of phase with its peers for good.
            if form.generation < self._newest_world:
                return False
            self.world.form(form)
            return True

        ready = WorldReady(worker_id=self.worker_id, generation=form.generation, ok=True)
        try:
            if not await self._run(join):
                log.info("world_form_superseded", generation=form.generation, newest=self._newest_world)
                return
        except Exception as exc:
            log.warning("world_form_failed", generation=form.generation, error=error_text(exc))
            ready.ok, ready.error = False, error_text(exc)
        if self.worker_id in form.members:
            await self.rt.bus.publish(subjects.WORLD_READY, ready)

    # ------------------------------------------------------------------------------ prefill
    async def _on_prefill(self, cmd: PrefillCommand, msg: Msg) -> None:
        # Each command in a task of its own: the subscription hands over the next one at once, so
        # a short prompt's chunks and a long prompt's take turns on the compute thread (a worker
        # is in one multi-worker ring at a time, so rings never wait on each other's order).
        self._keep(asyncio.create_task(self._handle_prefill(cmd, msg)))

    async def _handle_prefill(self, cmd: PrefillCommand, msg: Msg) -> None:
        rid = cmd.plan.request_id
        self._prefilling[rid] = cmd.plan
        try:
            result, loaded = await self.prefills.run(cmd)
            self.aborts.clear(rid)  # whatever the outcome: an abort only ever concerns a running prefill
            if result.ok:
                self._start_decode(cmd, result, loaded)
            self.decoding.wake.set()  # ticks that came during the prefill can run now
            await self.rt.bus.reply(msg, result)
        finally:
            self._prefilling.pop(rid, None)

    def _start_decode(self, cmd: PrefillCommand, result: PrefillResult, loaded: bool) -> None:
        """After a prefill: its computed blocks are stored in the background, its decode shard
        copied as it grows, and the ring's leader starts decoding it."""
        rid = cmd.plan.request_id
        active = self.engine.requests.get(rid)
        if active is None:  # a failed ring peer got the request released already
            return
        if active.kv.acquire():  # its pages stay this request's until the blocks are stored
            self._keep(asyncio.create_task(self.prefills.store(cmd, active.kv, loaded)))
        # A request that frees pages behind its window has no whole shard to copy (the freed
        # rows' entries read the scratch page); a lost worker's requests are recomputed anyway.
        if self.shards is not None and active.window is None:
            self.shards.track(rid, cmd.member, active.kv)
        # its decode spans hang under the request's root span
        self.decoding.trace_context[rid] = (propagate.extract(cmd.decode.trace) if cmd.decode is not None
                                            else otel_context.get_current())
        if cmd.member == cmd.plan.leader() and cmd.decode is not None:
            if cmd.decode.owner:
                self.owners.own(rid, cmd.decode.owner)
            self.decoding.join(cmd, result.token_id)


    def _keep(self, task: asyncio.Task) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------------------- decode
    async def _on_decode(self, tick: DecodeStep, _msg: Msg) -> None:
        """A ring leader's tick: run this step of its request here too (or end it: `finish`)."""
        rid = tick.request_id
        if rid in self.engine.requests or rid in self._prefilling:
            self.decoding.follow(tick)
        elif not tick.finish:
            log.warning("decode_tick_unknown_request", request_id=rid, step=tick.step)

    # ------------------------------------------------------------------------------ owners
    async def _on_scheduler_heartbeat(self, beat: ServiceHeartbeat, _msg: Msg) -> None:
        self.owners.on_heartbeat(beat.instance)

    async def _end_orphans(self) -> None:
        """Requests led here whose scheduler went silent are ended: nobody reads their tokens."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            for rid in self.owners.settled():  # ended here, and the owner lived to reply
                self.owners.forget(rid)
                self._ended_plans.pop(rid, None)
            for rid in self.owners.orphans():
                log.warning("request_orphaned", request_id=rid, timeout_s=self.settings.heartbeat_timeout_s)
                led = self.batcher.led.get(rid)
                decode = led.decode if led is not None else self._ended_plans.pop(rid, None)
                if decode is not None:
                    await self._tell_client_owner_lost(decode, rid)
                if self.owners.was_ended(rid):  # its KV is gone already
                    self.owners.forget(rid)
                    continue
                ended = self.batcher.drop(rid)
                self._keep(asyncio.create_task(self._end_request(rid, ended.followers if ended else [])))
                self.owners.forget(rid)

    async def _tell_client_owner_lost(self, decode: DecodePlan, request_id: str) -> None:
        """The client's answer when its scheduler died: `unavailable`, on its own reply subject."""
        if not decode.reply:
            return
        reply = ErrorReply(error=ErrorBody(code=ErrorCode.UNAVAILABLE, request_id=request_id,
                                           message="the scheduler running this request stopped answering; retry"))
        content_type = decode.reply_content_type or codec.JSON
        try:
            await self.rt.bus.publish_raw(decode.reply, codec.dump_public(reply, content_type),
                                          headers={"Content-Type": content_type})
        except Exception as exc:  # the client may be gone too
            log.warning("orphan_reply_failed", request_id=request_id, error=error_text(exc))

    # ------------------------------------------------------------------------------ abort
    async def _on_abort(self, cmd: AbortCommand, _msg: Msg) -> None:
        """The client cancelled a request being prefilled: its prefill stops at the next layer
        boundary (an abort arriving before the prefill stops it before its first layer)."""
        self.aborts.request(cmd.request_id)
        log.info("prefill_abort_requested", request_id=cmd.request_id)

    # ------------------------------------------------------------------------------ release
    async def _on_release(self, cmd: ReleaseCommand, _msg: Msg) -> None:
        """The scheduler ends a request (stop string, cancel, failure): it leaves the decode loop
        before the next step; a ring it leads is told to end it too."""
        if cmd.request_id in self._prefilling:  # the scheduler gave up on it: stop the prefill
            self.aborts.request(cmd.request_id)
            return
        self.aborts.clear(cmd.request_id)
        ended = self.batcher.drop(cmd.request_id)
        await self._end_request(cmd.request_id, ended.followers if ended is not None else [])

    async def _end_request(self, request_id: str, followers: list[str], finished: DecodePlan | None = None) -> None:
        """Drop a request's KV here (after any step of it already queued in the compute thread)
        and, for a ring led here, tell the members to drop theirs. `finished`: it ended here on
        its own (its plan), so its owner is watched a while longer (OwnerWatch.ended)."""
        self.batcher.drop(request_id)
        if finished is not None and finished.owner:
            self.owners.ended(request_id)
            self._ended_plans[request_id] = finished
        else:
            self.owners.forget(request_id)
        context = self.decoding.trace_context.pop(request_id, None)
        token = otel_context.attach(context) if context is not None else None  # logs name its trace
        try:
            await self._release(request_id, followers)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _release(self, request_id: str, followers: list[str]) -> None:
        for worker in followers:  # after this request's last tick, on the same subject: in order
            await self.rt.bus.publish(subjects.worker_inbox(worker, "decode"), DecodeStep(
                request_id=request_id, step=-1, token_id=0, position=0, append_member=0,
                sampling=SamplingParams(), finish=True))
        released = await self._run(self.engine.release, request_id)
        if released is not None:
            log.info("request_released", request_id=request_id)
            if released.blocks and released.kv.mass.numel():
                # H2O: the attention mass the stored blocks received feeds the kvstore's eviction
                masses = block_masses(released.kv.positions, released.kv.mass, released.blocks)
                self._keep(asyncio.create_task(self.prefix.index.touch(
                    self.model_info.name, masses, released.plan.kv_quant.value)))
        if self.shards is not None:
            self.shards.forget(request_id)


def main() -> None:
    service_main(WorkerApp)
    # The compute thread may still sit in a transfer with a dead peer (it ends only at the
    # distributed timeout); the interpreter would wait for it at exit. Everything is drained.
    os._exit(0)


if __name__ == "__main__":
    main()
