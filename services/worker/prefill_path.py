"""One prefill command on this worker, from its cached blocks to its result.

The worker's own KV tiers first (the pool and host memory, resident_prefix.py), else the KV
store's blocks from Redis; then the prefill itself on the compute thread: chunk by chunk for a
prompt one worker holds (the decode steps queued meanwhile run between two chunks), whole as a
ring prefill otherwise. A prefill told to abort stops at a layer boundary (on a ring, every
member at the same one). Each prefill has its span (`worker.prefill`, with a `ring.layer` event
per layer), its progress messages (from the ring's leader) and its log events; loading and
storing the prefix blocks have spans of their own. Whether cached blocks are loaded from
Redis at all is the cost model's choice (prefix_costs.py), from this worker's measured rates.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import structlog
from opentelemetry import trace

from shared import subjects
from shared.attention.layout import causal_block_sparsity
from shared.attention.ring import RingStep
from shared.bus import Bus
from shared.errors import error_text
from shared.messages import ErrorCode, PrefillCommand, PrefillProgress, PrefillResult
from shared.metrics import RingserveMetrics
from shared.settings import Settings
from services.worker.aborts import AbortFlags
from services.worker.chunked_prefill import one_worker_positions
from services.worker.engine import WorkerEngine
from services.worker.errors import PrefillAborted
from services.worker.kv_cache import CachedRows, KVPoolFull, RequestKV
from shared.positions import clip_runs, run_tokens
from services.worker.prefix import PrefixCache, member_runs
from services.worker.prefix_costs import PrefixCosts
from services.worker.world import World

log = structlog.get_logger("worker")
# Progress messages at most this often: a long prefill reports without flooding the bus.
PROGRESS_MIN_INTERVAL_S = 0.2


class PrefillPath:
    def __init__(self, engine: WorkerEngine, prefix: PrefixCache, world: World, aborts: AbortFlags,
                 settings: Settings, bus: Bus, tracer: trace.Tracer, metrics: RingserveMetrics,
                 compute: Callable[..., Awaitable], loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.prefix = prefix
        self.world = world
        self.aborts = aborts
        self.settings = settings
        self.bus = bus
        self.tracer = tracer
        self.metrics = metrics
        self.compute = compute  # compute(fn, *args): fn on the compute thread
        self.loop = loop
        self.layers = engine.model.config.num_hidden_layers
        self.costs = (PrefixCosts(settings.kv_cost_rate_weight, settings.kv_cost_probe_every)
                      if settings.kv_cost_model else None)

    async def run(self, cmd: PrefillCommand) -> tuple[PrefillResult, bool]:
        """-> (the result to reply with, whether the prompt's cached blocks are stored already:
        loaded, mapped from this worker's tiers, or left in Redis by the cost model; only blocks a
        load missed are stored again)."""
        rid = cmd.plan.request_id
        with self.tracer.start_as_current_span("worker.prefill", attributes={
            "request_id": rid, "ring.size": cmd.plan.size, "ring.member": cmd.member, "tokens": len(cmd.input_ids),
        }) as span:
            log.info("prefill_started", request_id=rid, member=cmd.member, ring_size=cmd.plan.size,
                     tokens=len(cmd.input_ids), cached_tokens=cmd.cached_tokens)
            t0 = time.perf_counter()
            cached, resident, skipped = None, None, False
            spent = [0.0]  # seconds of this prefill's own compute-thread jobs
            ring_steps: list[tuple[int, RingStep]] = []
            try:
                if cmd.plan.size > 1 and cmd.plan.world_generation != self.world.generation:
                    raise RuntimeError(f"ring formed for world generation {cmd.plan.world_generation}, worker is in {self.world.generation}")
                # The worker's own tiers first: a prompt whose cached blocks are still in this
                # worker's pool or host memory maps or copies them (resident_prefix.py); else they
                # come from Redis. `taken` is read in the same compute job: another take may follow.
                if one_worker_positions(cmd) and cmd.cached_tokens and self.engine.resident is not None:
                    resident, taken = await self.compute(
                        lambda: (self.engine.take_resident(cmd), self.engine.resident.last_take))
                if resident:
                    span.set_attribute("kv.resident_blocks", len(resident))
                    span.set_attribute("kv.host_blocks", taken.host)
                    log.info("kv_prefix_resident_hit", request_id=rid, blocks=len(resident), host_blocks=taken.host)
                    self.prefix.record_resident_hit(taken.pool, taken.host)
                else:
                    cached, skipped = await self.load(cmd)
                result = await self._compute(cmd, cached, resident, ring_steps, span, spent)
                # The prefill rate of the cost model: one worker's own compute time (a ring's
                # includes its peers', a chunked prefill's wall time other requests' steps).
                if self.costs is not None and result.ok and one_worker_positions(cmd):
                    held = len(resident) * self.engine.pool.page_tokens if resident else (
                        cached.tokens if cached is not None else 0)
                    self.costs.prefill.add(run_tokens(member_runs(cmd)) - held, spent[0])
            except PrefillAborted as exc:
                self._report_ring_steps(span, ring_steps)
                self.engine.release(rid)
                span.set_attribute("prefill.aborted", True)
                span.add_event("prefill.aborted", {"layer": exc.layer, "layers": exc.layers,
                                                   "requested_here": exc.requested_here})
                log.info("prefill_aborted", request_id=rid, member=cmd.member, ring_size=cmd.plan.size,
                         layer=exc.layer, layers=exc.layers, requested_here=exc.requested_here,
                         ms=round((time.perf_counter() - t0) * 1000, 2))
                result = PrefillResult(request_id=rid, member=cmd.member, ok=False, cancelled=True, error=str(exc),
                                       cached_tokens=cached.tokens if cached is not None else 0)
            except Exception as exc:
                log.exception("prefill_failed", request_id=rid)
                span.record_exception(exc)
                self.engine.release(rid)
                code = ErrorCode.OVERLOADED if isinstance(exc, KVPoolFull) else ErrorCode.INTERNAL
                result = PrefillResult(request_id=rid, member=cmd.member, ok=False, error_code=code,
                                       error=error_text(exc))
            if result.ok:
                active = self.engine.requests.get(rid)
                if active is not None and active.kv.freed_pages:  # pages behind a window, given back
                    span.set_attribute("kv.freed_pages", active.kv.freed_pages)
                self.metrics.record_prefill(len(cmd.input_ids), time.perf_counter() - t0)
                mine = [(x.start, x.end) for x in cmd.plan.segments[cmd.member]]
                self.metrics.record_attention_sparsity(*causal_block_sparsity(
                    mine, [[(x.start, x.end) for x in segs] for segs in cmd.plan.segments]))
            log.info("prefill_done", request_id=rid, member=cmd.member, tokens=len(cmd.input_ids),
                     cached=result.cached_tokens, ms=round((time.perf_counter() - t0) * 1000, 2), ok=result.ok)
        return result, cached is not None or bool(resident) or skipped

    async def _compute(self, cmd: PrefillCommand, cached: CachedRows | None, resident: list[int] | None,
                       ring_steps: list[tuple[int, RingStep]], span: trace.Span, spent: list[float]) -> PrefillResult:
        # Asked before every layer; on a ring the members agree there, so every member stops at
        # the same layer (or none does) and nobody is left in a transfer.
        should_abort = functools.partial(self.aborts.is_set, cmd.plan.request_id)
        progress = self._progress(cmd)
        step_tokens = self.settings.prefill_step_tokens
        loaded = cached.upto if cached is not None else 0  # the cost model may have chosen to compute them all
        if resident or (one_worker_positions(cmd) and cmd.plan.prompt_tokens - loaded > step_tokens):
            # chunk by chunk: the decode steps queued meanwhile run between two chunks
            span.set_attribute("prefill.step_tokens", step_tokens)
            chunks = await self._timed(spent, self.engine.prefill_begin, cmd, cached, resident)
            while not chunks.finished:
                await self._timed(spent, self.engine.prefill_chunk, chunks, step_tokens, progress, should_abort)
            return await self._timed(spent, self.engine.prefill_end, chunks)
        try:
            return await self._timed(spent, self.engine.prefill, cmd, progress, cached,
                                     lambda layer, step: ring_steps.append((layer, step)), should_abort)
        finally:
            self._report_ring_steps(span, ring_steps)

    async def _timed(self, spent: list[float], fn: Callable, *args):
        """fn(*args) on the compute thread, its time there added to spent[0] (not the queueing)."""
        def job():
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[0] += time.perf_counter() - t0

        return await self.compute(job)

    def _progress(self, cmd: PrefillCommand) -> Callable[[int], None]:
        """The compute thread's progress callback: the leader publishes, at most so often."""
        rid, is_leader, last_sent = cmd.plan.request_id, cmd.member == cmd.plan.leader(), [0.0]

        def progress(layers_done: int) -> None:
            now = time.monotonic()
            if is_leader and (now - last_sent[0] >= PROGRESS_MIN_INTERVAL_S or layers_done == self.layers):
                last_sent[0] = now
                asyncio.run_coroutine_threadsafe(self.bus.publish(
                    subjects.progress(rid), PrefillProgress(request_id=rid, layers_done=layers_done, layers=self.layers),
                ), self.loop)

        return progress

    def _report_ring_steps(self, span: trace.Span, steps: list[tuple[int, RingStep]]) -> None:
        """One span event per layer (bytes sent around the ring, host wait), and the metric."""
        by_layer: dict[int, list[RingStep]] = {}
        for layer, step in steps:
            by_layer.setdefault(layer, []).append(step)
            if step.bytes_sent:
                self.metrics.record_ring_comm(step.wait_ms, op="ring_step")
        for layer, layer_steps in sorted(by_layer.items()):
            span.add_event("ring.layer", {
                "layer": layer, "steps": len(layer_steps),
                "bytes_sent": sum(s.bytes_sent for s in layer_steps),
                "wait_ms": round(sum(s.wait_ms for s in layer_steps), 3),
                "blocks": sum(s.blocks for s in layer_steps),
                "blocks_skipped": sum(s.blocks_skipped for s in layer_steps),
                "peers": max(s.peers for s in layer_steps),  # members sent to (a direct exchange: fewer)
            })
        steps.clear()  # reported once, however the prefill ended

    async def load(self, cmd: PrefillCommand) -> tuple[CachedRows | None, bool]:
        """-> (K/V of this member's cached prompt positions from the KV store, or None: compute
        them all; whether the cost model chose to compute them)."""
        if cmd.cached_tokens == 0:
            return None, False
        quant = cmd.plan.kv_quant.value
        with self.tracer.start_as_current_span("worker.kv_load", attributes={
            "request_id": cmd.plan.request_id, "cached_tokens": cmd.cached_tokens, "kv.quant": quant,
        }) as span:
            if self.costs is not None and not self._worth_loading(cmd, quant, span):
                span.set_attribute("kv.loaded_tokens", 0)
                return None, True
            t0 = time.perf_counter()
            try:
                cached = await self.prefix.load(cmd)
            except Exception as exc:  # the store only ever saves work: a failed load means computing
                log.warning("kv_prefix_load_failed", request_id=cmd.plan.request_id, error=error_text(exc))
                span.record_exception(exc)
                cached = None
            if cached is not None and self.costs is not None:
                self.costs.load_rate(quant).add(cached.tokens, time.perf_counter() - t0)
            span.set_attribute("kv.loaded_tokens", cached.tokens if cached is not None else 0)
            return cached, False

    def _worth_loading(self, cmd: PrefillCommand, quant: str, span: trace.Span) -> bool:
        """The cost model's choice for this member's cached positions, in the span, the log and
        the metrics."""
        tokens = run_tokens(clip_runs(member_runs(cmd), 0, cmd.cached_tokens))
        decision = self.costs.decide(tokens, quant)
        choice = "compute" if not decision.load else "probe" if decision.probe else "load"
        span.set_attributes({"kv.cost.decision": choice, "kv.cost.tokens": tokens,
                             "kv.cost.load_s": decision.load_s or -1.0, "kv.cost.compute_s": decision.compute_s or -1.0})
        self.prefix.store.metrics.prefix_decision(choice, quant, decision.saved_s if choice != "probe" else 0.0)
        if choice != "load":
            log.info("kv_prefix_cost_choice", request_id=cmd.plan.request_id, decision=choice, tokens=tokens,
                     load_s=decision.load_s, compute_s=decision.compute_s)
        return decision.load

    async def store(self, cmd: PrefillCommand, kv: RequestKV, loaded: bool) -> None:
        """Store the blocks this prefill computed; `kv` was acquired for it, and is let go here."""
        try:
            with self.tracer.start_as_current_span("worker.kv_store", attributes={
                "request_id": cmd.plan.request_id, "kv.quant": cmd.plan.kv_quant.value,
            }) as span:
                try:
                    rid = cmd.plan.request_id
                    stored = await self.prefix.store_computed(cmd, kv, loaded,
                                                              running=lambda: rid in self.engine.requests)
                except Exception as exc:  # a cache write failing must never reach the request
                    log.warning("kv_prefix_store_failed", request_id=cmd.plan.request_id, error=error_text(exc))
                    span.record_exception(exc)
                    return
                span.set_attribute("kv.blocks_stored", stored)
                if stored:
                    log.info("kv_prefix_stored", request_id=cmd.plan.request_id, member=cmd.member, blocks=stored)
        finally:
            kv.unacquire()
