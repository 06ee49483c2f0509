"""The worker's compute: ring-attention prefill of its share of a prompt into the KV pool, and
batched decode steps over the pool (sequence-parallel for requests spread over a ring).

No NATS here. The engine runs in one compute thread; the two distributed exchanges it needs are
passed in as callables, so tests can drive it with in-process fakes of *other workers* while the
math stays the real one:
  - `ring` : torch.distributed point-to-point over the request's ring (prefill, collective fusion)
  - `fuse` : the bus fusion service (decode), a blocking call into the worker's event loop
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.attention.decode import collective_merge
from shared.attention.pattern import KeyPattern, extra_key_rows, layer_pattern
from shared.attention.ring import RingStep, ring_any, ring_attention
from shared.messages import (
    DecodeResult,
    DecodeStep,
    MergedItem,
    PartialItem,
    PrefillCommand,
    PrefillResult,
    PromptBlock,
    RingPlan,
    SamplingParams,
)
from shared.positions import clip_runs, positions_of, row_of
from shared.sampling import request_generator, sample_batch
from services.worker.chunked_prefill import PrefillChunks, run_chunk
from services.worker.resident_prefix import ResidentPrefix
from services.worker.errors import PrefillAborted, failed
from services.worker.kv_cache import SCRATCH_PAGE, CachedRows, KVPool, KVPoolFull, RequestKV
from services.worker.importance import add_importance
from services.worker.ring_groups import RingGroups, ring_ranks
from services.worker.step import decode_forward, decode_inputs, padded_rows, recording_for, rope_for
from services.worker.window_free import after_prefill, free_behind_window, log_window_freed, request_patterns

# fuse(partials of one layer for a batch of requests) -> merged results in the same order
FuseFn = Callable[[list[PartialItem]], list[MergedItem]]
ProgressFn = Callable[[int], None]  # layers done
RingStepFn = Callable[[int, RingStep], None]  # (layer, what the ring step did)
AbortFn = Callable[[], bool]  # whether this member was told to abort the prefill (thread-safe)


@dataclass
class ActiveRequest:
    plan: RingPlan
    member: int
    kv: RequestKV
    sampling: SamplingParams
    generator: torch.Generator | None
    blocks: list[PromptBlock] = field(default_factory=list)  # stored prompt blocks overlapping this shard
    pattern: KeyPattern | None = None  # the request's own attention pattern (every layer); None: the model's
    window: KeyPattern | None = None  # the window its pages are freed behind (window_free.py); None: all kept

    @property
    def has_extra_keys(self) -> bool:
        """Whether its decode attends sink or strided rows outside the window (eager steps)."""
        return self.pattern is not None and self.pattern.has_extra_keys


class RequestNotHeld(KeyError):
    """A decode step of a request this worker no longer holds (released while the step waited)."""


class WorkerEngine:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, pool: KVPool,
                 dist_timeout_s: float | None = None, graphs=None, finish_chunk_tokens: int = 8192):
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.pool = pool
        self.graphs = graphs  # DecodeGraphs (CUDA), or None: every step eager
        self.finish_chunk_tokens = finish_chunk_tokens  # prefill rows per MLP call
        self.requests: dict[str, ActiveRequest] = {}
        self._steps = 0  # decode batches run: every importance_every-th is observed
        self.groups = RingGroups(None if dist_timeout_s is None else datetime.timedelta(seconds=dist_timeout_s))
        self.resident: ResidentPrefix | None = None  # prompt blocks kept in the pool (the device tier)

    # ------------------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, cmd: PrefillCommand, progress: ProgressFn | None = None,
                cached: CachedRows | None = None, on_ring_step: RingStepFn | None = None,
                should_abort: AbortFn | None = None) -> PrefillResult:
        """This member's share of a ring prefill. With `cached`, its positions below `cached.upto`
        are not computed: their K/V rows are the loaded ones, and only the rest go through the
        layers (as queries; every member still sends all its K/V around the ring). Each layer's
        K/V rows go into the request's pages of the pool once its attention is done.

        With `should_abort`, it is asked before every layer; a ring's members agree on it there
        (`ring_any`: one tiny all_reduce per layer, so every member must pass it or none) and
        all raise PrefillAborted before the same layer, nothing kept."""
        plan, member = cmd.plan, cmd.member
        segments = [[(s.start, s.end) for s in member_segments] for member_segments in plan.segments]
        mine = segments[member]
        if sum(e - s for s, e in mine) != len(cmd.input_ids):
            raise ValueError(f"member {member} got {len(cmd.input_ids)} ids for the positions of {mine}")
        upto, n_cached = (cached.upto, cached.tokens) if cached is not None else (0, 0)
        if n_cached != sum(e - s for s, e in clip_runs(mine, 0, upto)):
            raise ValueError(f"member {member}: {n_cached} cached rows for its positions below {upto}")
        todo = clip_runs(mine, upto, plan.prompt_tokens)  # the positions computed here
        positions = positions_of(todo, self.device)
        ids = torch.tensor(cmd.input_ids[n_cached:], dtype=torch.long, device=self.device)

        pattern, window = request_patterns(self.config, cmd)
        kv = RequestKV(plan.request_id, member, self.pool)
        try:
            kv.reserve(len(cmd.input_ids))
            for s, e in mine:
                kv.note_positions(s, e)
            h = self.model.embed(ids)  # [t, hidden], computed rows only
            cos, sin = self.model.rope(positions, seq_len=plan.prompt_tokens)
            layers = len(self.model.layers)
            for i, layer in enumerate(self.model.layers):
                if should_abort is not None:
                    here = bool(should_abort())
                    # On a ring every member takes part in the agreement, whatever it saw itself.
                    if self._ring_aborts(plan, here) if plan.size > 1 else here:
                        raise PrefillAborted(i, layers, here)
                q, k, v = layer.qkv(h, cos, sin)  # q [t, H, d], k/v [t, KVH, d]
                if cached is not None:  # this member's rows: the loaded ones, then the computed
                    k = torch.cat([cached.keys[i].to(k.dtype), k])
                    v = torch.cat([cached.values[i].to(v.dtype), v])
                out, _lse = ring_attention(
                    q, k, v, scale=self.model.attn_scale, q_segments=todo,
                    kv_segments=segments, ring_ranks=ring_ranks(plan),
                    on_step=None if on_ring_step is None else functools.partial(on_ring_step, i),
                    pattern=layer_pattern(pattern, self.config.window_of(i)),
                )
                self.pool.write(i, kv.pages, 0, k, v)
                del q, k, v
                # Row by row the same math; in slices, the MLP's [t, intermediate] activations of a
                # long prompt (3.5 GiB per tensor at 128K tokens of an 8B model) stay bounded.
                for lo in range(0, h.shape[0], self.finish_chunk_tokens):
                    hi = lo + self.finish_chunk_tokens
                    h[lo:hi] = layer.finish(h[lo:hi], out[lo:hi].to(self.dtype))
                del out
                if progress is not None:
                    progress(i + 1)
        except BaseException:
            kv.free()  # aborted or failed: the pages go back now
            raise
        kv.tokens = len(cmd.input_ids)
        active = self._hold(cmd, kv, pattern, window)  # a ring's members kept their segments until now
        result = PrefillResult(request_id=plan.request_id, member=member, ok=True, kv_tokens=kv.tokens,
                               cached_tokens=n_cached)
        if member == plan.leader():
            last_row = row_of(todo, plan.prompt_tokens - 1)  # the last position is never cached
            logits = self.model.logits(h[last_row : last_row + 1])
            (result.token_id,), (result.logprob,) = sample_batch(logits, [cmd.sampling], [active.generator],
                                                                 [plan.prompt_tokens])
        return result

    # ---- chunked (a request held by one worker: other requests' decode steps run between chunks)
    def prefill_begin(self, cmd: PrefillCommand, cached: CachedRows | None = None,
                      resident: list[int] | None = None) -> PrefillChunks:
        """A chunked prefill of `cmd` (one_worker_positions(cmd)): its loaded prefix rows written,
        or its `resident` prefix pages (take_resident) mapped as its first pages."""
        n_cached = cached.tokens if cached is not None else len(resident or []) * self.pool.page_tokens
        kv = RequestKV(cmd.plan.request_id, cmd.member, self.pool, pages=list(resident or []))  # freed on failure
        try:
            if len(cmd.input_ids) != cmd.plan.prompt_tokens or (cached is not None and cached.upto != n_cached):
                raise ValueError(f"a chunked prefill holds the whole prompt: {len(cmd.input_ids)} ids, "
                                 f"{n_cached} cached")
            pattern, window = request_patterns(self.config, cmd)  # freed behind `window`: pages chunk by chunk
            kv.reserve(len(cmd.input_ids) if window is None else n_cached)
            kv.note_positions(0, cmd.plan.prompt_tokens)
            if cached is not None:
                for i in range(len(self.model.layers)):
                    self.pool.write(i, kv.pages, 0, cached.keys[i], cached.values[i])
        except BaseException:
            kv.free()
            raise
        ids = torch.tensor(cmd.input_ids, dtype=torch.long, device=self.device)
        return PrefillChunks(cmd, kv, ids, done=n_cached, cached=n_cached, pattern=pattern, window=window)

    def prefill_chunk(self, state: PrefillChunks, tokens: int, progress: ProgressFn | None = None,
                      should_abort: AbortFn | None = None) -> None:
        """The next `tokens` positions; an abort asked for before it drops the request's rows."""
        layers = len(self.model.layers)
        try:
            if should_abort is not None and should_abort():
                raise PrefillAborted(0, layers, True)
            run_chunk(state, self.model, self.config, self.dtype, tokens, self.finish_chunk_tokens)
        except BaseException:
            state.kv.free()
            raise
        if progress is not None:
            progress(layers * (state.done - state.cached) // max(state.total - state.cached, 1))

    @torch.inference_mode()
    def prefill_end(self, state: PrefillChunks) -> PrefillResult:
        """The request joins the held ones; its first token, sampled from the last position."""
        cmd, kv = state.cmd, state.kv
        kv.tokens = state.total
        active = self._hold(cmd, kv, state.pattern, state.window)
        result = PrefillResult(request_id=cmd.plan.request_id, member=cmd.member, ok=True, kv_tokens=kv.tokens,
                               cached_tokens=state.cached)
        logits = self.model.logits(state.last_hidden)
        (result.token_id,), (result.logprob,) = sample_batch(logits, [cmd.sampling], [active.generator],
                                                             [cmd.plan.prompt_tokens])
        return result

    def _hold(self, cmd: PrefillCommand, kv: RequestKV, pattern: KeyPattern | None,
              window: KeyPattern | None) -> ActiveRequest:
        """A prefilled request joins the held ones, its rows finished before anyone reads them (I/O
        stream), the pages behind its window (if it frees behind one) given back."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        after_prefill(kv, window, cmd.plan.prompt_tokens)
        active = ActiveRequest(cmd.plan, cmd.member, kv, cmd.sampling, request_generator(cmd.sampling, self.device),
                               blocks=list(cmd.kv_blocks), pattern=pattern, window=window)
        self.requests[cmd.plan.request_id] = active
        return active

    def _ring_aborts(self, plan: RingPlan, here: bool) -> bool:
        """Whether any member of the ring was told to abort (every member asks at the same layer)."""
        return ring_any(here, self.groups.agreement(plan), torch.device("cpu"))

    def kv_reusable(self, seq_len: int) -> bool:
        """Whether K/V computed in a sequence of `seq_len` tokens hold in any other sequence: true
        unless dynamic NTK rope has stretched its frequencies for a sequence this long."""
        return self.config.rope.rope_type != "dynamic" or seq_len <= self.config.max_position_embeddings

    # ------------------------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode(self, steps: list[DecodeStep], fuse: FuseFn | None, collective: bool = False,
               importance_every: int = 0) -> list[DecodeResult]:
        """One decode step for a batch of requests (each fed the token it generated last).

        Requests held by this worker alone run as one batch: one paged attention call per layer
        for all of them, a captured CUDA graph where there is one for the batch's size. Requests
        spread over a ring run as a second batch whose per-layer partials are merged with the
        peers' by `fuse` (the fusion service) or, with `collective`, by point-to-point exchange
        inside the ring; the member named by `append_member` appends the token's K/V to its
        shard. Every `importance_every`-th batch (0: never) also adds the attention mass each
        cached key received to its request's H2O importance (one more pass over the keys).
        """
        results: list[DecodeResult | None] = [None] * len(steps)
        runnable = []
        for b, s in enumerate(steps):
            r = self.requests.get(s.request_id)
            if r is None:  # released after its step was batched (cancel, drain): it alone is dropped
                results[b] = failed(s, -1, RequestNotHeld(f"request {s.request_id} is not held here"))
                continue
            try:  # the page its new row goes to (a full pool fails this request, not the batch)
                if s.append_member == r.member:
                    r.kv.reserve(r.kv.tokens + 1)
                runnable.append(b)
            except KVPoolFull as exc:
                results[b] = failed(s, r.member, exc)
        # One batch in `importance_every` of the worker's (not every request's own N-th step, which
        # would leave few steps for the graphs once requests are staggered) observes all its rows.
        self._steps += 1
        observe = bool(importance_every) and self._steps % importance_every == 0
        held = {b: self.requests[steps[b].request_id] for b in runnable}
        local = [b for b in runnable if held[b].plan.size == 1 and not held[b].has_extra_keys]
        # hybrid/strided requests held here alone: a batch of their own, eager, so that the others
        # keep the graphs
        local_extra = [b for b in runnable if held[b].plan.size == 1 and held[b].has_extra_keys]
        ring = [b for b in runnable if held[b].plan.size > 1]
        for rows in (local, local_extra, ring):
            if not rows:
                continue
            try:
                done = self._decode_rows([steps[b] for b in rows], fuse, collective, observe)
            except Exception as exc:  # e.g. a ring's merge: its rows fail, the other batch stands
                done = [failed(steps[b], self.requests[steps[b].request_id].member, exc) for b in rows]
            for b, result in zip(rows, done):
                results[b] = result
        return results

    def _decode_rows(self, steps: list[DecodeStep], fuse: FuseFn | None, collective: bool,
                     observe: bool) -> list[DecodeResult]:
        reqs = [self.requests[s.request_id] for s in steps]
        appends = [s.append_member == r.member for s, r in zip(steps, reqs)]
        slots = [r.kv.next_slot() if a else (SCRATCH_PAGE, 0) for r, a in zip(reqs, appends)]
        seq_lens = [r.kv.tokens + a for r, a in zip(reqs, appends)]
        # Sliding layers attend from the first row inside the window; a request's own pattern does
        # in every layer (its window equals the model's, if the model has one: the API checks).
        model_window = self.config.sliding_window
        starts, full_layer_starts = [], []
        for s, r in zip(steps, reqs):
            window = r.pattern.window if r.pattern is not None else model_window
            start = r.kv.rows_through(s.position - window) if window is not None else 0
            starts.append(start)
            full_layer_starts.append(start if r.pattern is not None else 0)
        extra = any(r.has_extra_keys for r in reqs)
        leaders = [b for b, r in enumerate(reqs) if r.member == r.plan.leader()]
        spread = any(r.plan.size > 1 for r in reqs)

        pages = [r.kv.pages for r in reqs]
        results = [DecodeResult(request_id=s.request_id, member=r.member, step=s.step, ok=True)
                   for s, r in zip(steps, reqs)]
        greedy: dict[int, tuple[int, float]] = {}  # row -> (token, logprob) sampled in the graph
        if self.graphs is not None and not spread and not extra and self.graphs.fits(pages):
            logits, tokens, logprobs = self.graphs.run(steps, pages, slots, seq_lens, starts, full_layer_starts,
                                                       record=observe)
            logits_row = list(range(len(steps)))
            greedy = {b: (tokens[b], logprobs[b]) for b in range(len(steps)) if reqs[b].sampling.temperature == 0.0}
            if observe:
                add_importance(self.model, self.pool, [r.kv for r in reqs], self.graphs.recorded(len(steps)),
                               self.graphs.last_inputs(len(steps)))
        else:
            x = decode_inputs([s.token_id for s in steps], [s.position for s in steps], pages, slots, seq_lens,
                              starts, full_layer_starts, self.device)
            if extra:  # the rows each step attends outside its window (sinks, strided keys) of this shard
                x.extra_rows, x.extra_valid = padded_rows(
                    [extra_key_rows(r.pattern, r.kv.positions, s.position) if r.has_extra_keys else []
                     for s, r in zip(steps, reqs)], self.device)
            cos, sin = rope_for(self.model, x.positions, [s.position + 1 for s in steps])
            merge = self._merger(steps, reqs, fuse, collective) if spread else None
            # the global lse for the importance pass: a ring's merged one, or the one that
            # includes the sink and strided rows (the pass itself sees the window's rows)
            record = (recording_for(self.model, len(steps), self.pool.k[0].dtype, self.device, merged=spread or extra)
                      if observe else None)
            h = decode_forward(self.model, self.pool, x, cos, sin, merge, record)
            if record is not None:
                add_importance(self.model, self.pool, [r.kv for r in reqs], record, x)
            logits = self.model.logits(h[leaders]) if leaders else None  # [leaders, vocab]
            logits_row = {b: i for i, b in enumerate(leaders)}

        for b, (token, logprob) in greedy.items():
            results[b].token_id, results[b].logprob = token, logprob
        rest = [b for b in leaders if b not in greedy]
        if rest:  # the step's one host synchronisation (after the graph's, for sampled rows)
            # a step's token lands one past the token it feeds back (seeded draws derive from it)
            tokens, logprobs = sample_batch(logits[[logits_row[b] for b in rest]], [reqs[b].sampling for b in rest],
                                            [reqs[b].generator for b in rest], [steps[b].position + 1 for b in rest])
            for b, token, logprob in zip(rest, tokens, logprobs):
                results[b].token_id, results[b].logprob = token, logprob
        # Counted once the step is done: readers on other threads take `tokens` rows as written.
        if not rest and not greedy and self.device.type == "cuda":  # nothing synchronised above
            torch.cuda.current_stream(self.device).synchronize()
        for r, s, a in zip(reqs, steps, appends):
            if a:
                r.kv.tokens += 1
                r.kv.note_positions(s.position, s.position + 1)
            free_behind_window(r.kv, r.window, s.position + 1)  # the next step's query is at position + 1
        return results

    def _merger(self, steps: list[DecodeStep], reqs: list[ActiveRequest], fuse: FuseFn | None, collective: bool):
        """The per-layer merge of the rows' partials with their ring peers' (a request held by
        this worker alone would merge with nobody: it never gets here)."""
        def merge(layer: int, out: torch.Tensor, lse: torch.Tensor):
            if collective:
                merged = [collective_merge(out[b : b + 1], lse[b : b + 1], ring_ranks=ring_ranks(r.plan))
                          for b, r in enumerate(reqs)]
            else:
                assert fuse is not None
                partials = [PartialItem(request_id=s.request_id, step=s.step, layer=layer, member=r.member,
                                        parts=r.plan.size, out=out[b : b + 1], lse=lse[b : b + 1])
                            for b, (s, r) in enumerate(zip(steps, reqs))]
                merged = [(m.out, m.lse) for m in fuse(partials)]
            return (torch.cat([o.to(self.device) for o, _ in merged]),
                    torch.cat([l.to(self.device) for _, l in merged]))
        return merge

    def release(self, request_id: str) -> ActiveRequest | None:
        active = self.requests.pop(request_id, None)
        if active is not None:
            log_window_freed(active.kv, active.window, "end")
            if self.resident is not None and self._keeps_blocks(active):
                self.resident.keep(active.blocks, active.kv.pages)  # its full prompt blocks stay
            active.kv.free()
        return active

    def _keeps_blocks(self, active: ActiveRequest) -> bool:
        """Whether a request's prompt blocks may serve later prompts from the pool: held whole
        here, in position order, with the model's own attention, reusable K/V."""
        return (active.plan.size == 1 and active.pattern is None and bool(active.blocks)
                and self.kv_reusable(active.plan.prompt_tokens))

    def take_resident(self, cmd: PrefillCommand) -> list[int] | None:
        """The pool pages of the prompt's cached blocks, held for this prefill, if all are resident."""
        if self.resident is None or cmd.attention is not None:
            return None
        below = [b for b in cmd.kv_blocks if b.end <= cmd.cached_tokens]
        if len(below) * self.pool.page_tokens != cmd.cached_tokens:
            return None
        return self.resident.take(below)

    @property
    def kv_tokens(self) -> int:  # rows in the pool: pages given back behind a window do not count
        return sum(r.kv.held_tokens for r in self.requests.values())
