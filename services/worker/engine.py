"""The worker's compute: ring-attention prefill of its share of a prompt and sequence-parallel decode.

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
import torch.distributed as dist

from shared.attention.decode import collective_merge, decode_partial, key_attention_mass
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
from shared.sampling import request_generator, sample
from services.worker.kv_cache import RequestKV
from services.worker.prefix import CachedRows, clip_runs, row_of

# fuse(partials of one layer for a batch of requests) -> merged results in the same order
FuseFn = Callable[[list[PartialItem]], list[MergedItem]]
ProgressFn = Callable[[int], None]  # layers done
RingStepFn = Callable[[int, RingStep], None]  # (layer, what the ring step did)
AbortFn = Callable[[], bool]  # whether this member was told to abort the prefill (thread-safe)


class PrefillAborted(Exception):
    """A prefill stopped at a layer boundary because it was aborted; on a ring every member
    stops at the same `layer` (`layers` done), its partial K/V dropped."""

    def __init__(self, layer: int, layers: int, requested_here: bool):
        super().__init__(f"prefill cancelled before layer {layer} of {layers}")
        self.layer = layer
        self.layers = layers
        self.requested_here = requested_here  # this member saw the abort (else a peer did)


def segment_positions(segments: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[(start, end), ...] -> positions [tokens] int64, in segment order."""
    if not segments:  # a ring member whose positions all came from the KV store
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, e, device=device) for s, e in segments])


def causal_block_sparsity(q_segments: list[tuple[int, int]], kv_segments: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """(skipped, total) (query segment, key segment) pairs of a causal ring prefill: a key
    segment entirely after a query segment is never computed."""
    pairs = [(q, k) for q in q_segments for member in kv_segments for k in member]
    return sum(1 for q, k in pairs if k[0] >= q[1]), len(pairs)


class RingGroups:
    """The process group a ring agrees on.

    Point-to-point transfers (ring attention, collective decode fusion) run on the world group:
    on NCCL its communicator is made eagerly when the world forms (world.py), with every member
    taking part, so any subset of ranks may then exchange blocks while the others are busy
    elsewhere. No per-ring NCCL group is made: c10d names a new group by its ranks *and the
    number of groups the process already has*, so members whose earlier rings differed would
    wait under different names until the timeout.

    Collectives over the ring alone (the prefill abort agreement) run on a gloo group of
    exactly the ring's ranks, made directly over the world's store outside c10d's registry,
    on CPU flags, whatever the world's backend; cached for the world's generation (the store
    is the generation's, so its keys are never reused). It gets `timeout` (the world's
    distributed timeout): a dead peer ends the wait as it ends a transfer."""

    def __init__(self, timeout: datetime.timedelta | None = None) -> None:
        self.timeout = timeout
        self._generation = -1
        self._agreement: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def agreement(self, plan: RingPlan) -> dist.ProcessGroup:
        """The gloo group the ring's members run collectives on (a ring of more than one member)."""
        if plan.size == 1:
            raise ValueError("a ring of one agrees with itself")
        if plan.world_generation != self._generation:
            self._generation, self._agreement = plan.world_generation, {}
        ranks = tuple(plan.world_ranks)
        if ranks not in self._agreement:
            store = dist.PrefixStore(f"ringserve/agree/{'-'.join(map(str, ranks))}",
                                     dist.distributed_c10d._get_default_store())
            timeout = self.timeout or datetime.timedelta(minutes=30)  # torch's gloo default
            self._agreement[ranks] = dist.ProcessGroupGloo(store, ranks.index(dist.get_rank()), len(ranks), timeout)
        return self._agreement[ranks]


def ring_ranks(plan: RingPlan) -> list[int]:
    """World ranks of the ring; a ring of one needs no world (this process alone)."""
    if plan.size == 1:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return list(plan.world_ranks)


@dataclass
class ActiveRequest:
    plan: RingPlan
    member: int
    kv: RequestKV
    sampling: SamplingParams
    generator: torch.Generator | None
    blocks: list[PromptBlock] = field(default_factory=list)  # stored prompt blocks overlapping this shard


class WorkerEngine:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, dist_timeout_s: float | None = None):
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.requests: dict[str, ActiveRequest] = {}
        self.groups = RingGroups(None if dist_timeout_s is None else datetime.timedelta(seconds=dist_timeout_s))

    # ------------------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, cmd: PrefillCommand, progress: ProgressFn | None = None,
                cached: CachedRows | None = None, on_ring_step: RingStepFn | None = None,
                should_abort: AbortFn | None = None) -> PrefillResult:
        """This member's share of a ring prefill. With `cached`, its positions below `cached.upto`
        are not computed: their K/V rows are the loaded ones, and only the rest go through the
        layers (as queries; every member still sends all its K/V around the ring).

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
        positions = segment_positions(todo, self.device)
        ids = torch.tensor(cmd.input_ids[n_cached:], dtype=torch.long, device=self.device)

        cfg = self.config
        kv = RequestKV.empty(plan.request_id, member, cfg.num_hidden_layers, cfg.num_key_value_heads,
                             cfg.head_dim, self.dtype, self.device, capacity=len(cmd.input_ids))
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
                    del kv, h  # the partial K/V go now (the rest with the exception's traceback)
                    raise PrefillAborted(i, layers, here)
            q, k, v = layer.qkv(h, cos, sin)  # q [t, H, d], k/v [t, KVH, d]
            if cached is not None:
                kv.layers[i].append(cached.keys[i], cached.values[i])
            kv.layers[i].append(k, v)
            out, _lse = ring_attention(
                q, kv.layers[i].keys(), kv.layers[i].values(), scale=self.model.attn_scale, q_segments=todo,
                kv_segments=segments, ring_ranks=ring_ranks(plan),
                on_step=None if on_ring_step is None else functools.partial(on_ring_step, i),
            )
            h = layer.finish(h, out.to(self.dtype))
            if progress is not None:
                progress(i + 1)

        active = ActiveRequest(plan, member, kv, cmd.sampling, request_generator(cmd.sampling, self.device),
                               blocks=list(cmd.kv_blocks))
        self.requests[plan.request_id] = active
        result = PrefillResult(request_id=plan.request_id, member=member, ok=True, kv_tokens=kv.tokens,
                               cached_tokens=n_cached)
        if member == plan.leader():
            last_row = row_of(todo, plan.prompt_tokens - 1)  # the last position is never cached
            logits = self.model.logits(h[last_row : last_row + 1])[0]
            result.token_id, result.logprob = sample(logits, cmd.sampling, active.generator)
        return result

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

        Every ring member runs the same layers on the same token; the member named by
        `append_member` appends the token's K/V to its shard; partials are merged by `fuse` (the
        fusion service) or, with `collective`, by point-to-point exchange inside each ring.
        Every `importance_every`-th step (0: never) also adds the attention mass each cached key
        received to the request's H2O importance (one more pass over the shard's keys).
        """
        reqs = [self.requests[s.request_id] for s in steps]
        ids = torch.tensor([s.token_id for s in steps], dtype=torch.long, device=self.device)
        h = self.model.embed(ids)  # [B, hidden]
        cos_sin = [self.model.rope(torch.tensor([s.position], device=self.device), seq_len=s.position + 1) for s in steps]
        cos = torch.cat([c for c, _ in cos_sin])
        sin = torch.cat([s for _, s in cos_sin])

        for i, layer in enumerate(self.model.layers):
            q, k, v = layer.qkv(h, cos, sin)  # q [B, H, d]
            partials: list[PartialItem] = []
            for b, (step, req) in enumerate(zip(steps, reqs)):
                cache = req.kv.layers[i]
                if step.append_member == req.member:
                    cache.append(k[b : b + 1], v[b : b + 1])
                out, lse = decode_partial(q[b : b + 1], cache.keys(), cache.values(), self.model.attn_scale)
                partials.append(PartialItem(
                    request_id=step.request_id, step=step.step, layer=i, member=req.member,
                    parts=req.plan.size, out=out, lse=lse,
                ))
            if collective:
                merged = [
                    collective_merge(p.out, p.lse, ring_ranks=ring_ranks(req.plan))
                    for p, req in zip(partials, reqs)
                ]
            else:
                assert fuse is not None
                merged = [(m.out, m.lse) for m in fuse(partials)]
            for b, (step, req) in enumerate(zip(steps, reqs)):
                if importance_every and step.step % importance_every == 0:
                    cache = req.kv.layers[i]
                    req.kv.add_mass(key_attention_mass(q[b : b + 1], cache.keys(), self.model.attn_scale,
                                                       merged[b][1].to(self.device)))
            attn = torch.cat([o.to(device=self.device, dtype=self.dtype) for o, _ in merged])  # [B, H, d]
            h = layer.finish(h, attn)

        results = []
        for b, (step, req) in enumerate(zip(steps, reqs)):
            if step.append_member == req.member:
                req.kv.note_positions(step.position, step.position + 1)
            result = DecodeResult(request_id=step.request_id, member=req.member, step=step.step, ok=True)
            if req.member == req.plan.leader():
                logits = self.model.logits(h[b : b + 1])[0]
                result.token_id, result.logprob = sample(logits, req.sampling, req.generator)
            results.append(result)
        return results

    def release(self, request_id: str) -> ActiveRequest | None:
        return self.requests.pop(request_id, None)

    @property
    def kv_tokens(self) -> int:
        return sum(r.kv.tokens for r in self.requests.values())

