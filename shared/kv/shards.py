"""A ring member's KV shard of one running request, copied to Redis as it grows, so that another
worker can load it (restore after a worker loss).

Unlike prefix blocks, a shard belongs to one request: it is written in increments (the prefill's
rows, then every few decode tokens), never quantized (a restored request must continue exactly),
and deleted when the request ends. Layout, all keys of one request on one Redis node (the node of
`shard_prefix(request_id)`, through the same consistent hashing as the blocks):

    ringserve:shard:{request}:{member}:{layer}:{seq}   increment `seq` of one layer (block format)
    ringserve:shard:{request}:{member}:positions        LIST of increments: {"seq", "layers", "runs": [[s, e], ...]}
    ringserve:shard:{request}:members                   SET of members with a shard

An increment's blobs and its positions entry are written in one MULTI/EXEC, so a reader never sees
positions whose rows are missing. Every key expires after `kv_shard_ttl_s`: the shard of a request
whose worker died without cleaning up goes away by itself. An unreachable Redis turns writes into
False and loads into None (see nodes.py); a shard is only ever a spare copy.

Shards count against the KV budget (`kv_budget_bytes`, with the prefix blocks): the worker asks
the kvstore for room before writing an increment (`reserve`) and skips it when refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
import torch
from redis.asyncio import Redis
from torch import Tensor

from shared.kv.block import CorruptBlock, decode_block, encode_block
from shared.kv.keys import KEY_NAMESPACE
from shared.kv.nodes import RedisNodes
from shared.kv.quant import dequantize_kv, quantize_kv
from shared.positions import Run
from shared.settings import Settings

log = structlog.get_logger("kv")
SHARD_QUANT = "none"  # lossless: the restored request must compute what the original would have


def shard_prefix(request_id: str) -> str:
    return f"{KEY_NAMESPACE}:shard:{request_id}"


def blob_key(request_id: str, member: int, layer: int, seq: int) -> str:
    return f"{shard_prefix(request_id)}:{member}:{layer}:{seq}"


def positions_key(request_id: str, member: int) -> str:
    return f"{shard_prefix(request_id)}:{member}:positions"


def members_key(request_id: str) -> str:
    return f"{shard_prefix(request_id)}:members"


@dataclass
class Shard:
    """One member's persisted K/V: rows in the order they were held, `runs` their positions."""

    runs: list[Run]
    keys: list[Tensor]  # per layer [rows, kv_heads, head_dim]
    values: list[Tensor]

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def positions(self) -> list[int]:
        return [p for start, end in self.runs for p in range(start, end)]


class ShardStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.nodes = RedisNodes.from_settings(settings)

    def _node(self, request_id: str) -> int:
        return self.nodes.node_for(shard_prefix(request_id))

    async def save_increment(
        self, request_id: str, member: int, seq: int, runs: Sequence[Run], keys: Sequence[Tensor],
        values: Sequence[Tensor], reserve: Callable[[int], Awaitable[bool]] | None = None,
    ) -> bool:
        """Store rows of every layer (keys/values[layer]: [rows, kv_heads, head_dim]) at positions
        `runs` as increment `seq`; True once they are in Redis. `reserve(nbytes)`, when given, is
        asked first for room for the increment's bytes: False leaves it unwritten (returns False)."""
        rows = sum(end - start for start, end in runs)
        if any(k.shape[0] != rows for k in keys) or len(keys) != len(values):
            raise ValueError(f"increment {seq}: every layer needs {rows} rows, one k and one v")
        blobs = await asyncio.to_thread(_encode_layers, keys, values, self.settings.kv_group_size)
        if reserve is not None and not await reserve(sum(len(blob) for blob in blobs)):
            return False
        entry = json.dumps({"seq": seq, "layers": len(blobs), "runs": [list(run) for run in runs]})
        ttl = self.settings.kv_shard_ttl_s

        async def write(client: Redis) -> bool:
            pipe = client.pipeline(transaction=True)
            for layer, blob in enumerate(blobs):
                pipe.set(blob_key(request_id, member, layer, seq), blob, ex=ttl)
            pipe.rpush(positions_key(request_id, member), entry)
            pipe.expire(positions_key(request_id, member), ttl)
            pipe.sadd(members_key(request_id), member)
            pipe.expire(members_key(request_id), ttl)
            await pipe.execute()
            return True

        return await self.nodes.call(self._node(request_id), write, False)

    async def load_shard(
        self, request_id: str, member: int, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> Shard | None:
        """Every increment of one member's shard, concatenated per layer; None if there is none,
        Redis is unreachable, or any blob is missing or corrupt."""

        async def read(client: Redis) -> tuple[list[dict], list[bytes | None]] | None:
            entries = [json.loads(e) for e in await client.lrange(positions_key(request_id, member), 0, -1)]
            if not entries:
                return None
            pipe = client.pipeline(transaction=False)
            for entry in entries:
                for layer in range(entry["layers"]):
                    pipe.get(blob_key(request_id, member, layer, entry["seq"]))
            return entries, await pipe.execute()

        found = await self.nodes.call(self._node(request_id), read, None)
        if found is None:
            return None
        entries, blobs = found
        try:
            return await asyncio.to_thread(_assemble, entries, blobs, dtype, device)
        except CorruptBlock as exc:
            log.warning("kv_shard_unreadable", request_id=request_id, member=member, error=str(exc))
            return None

    async def delete(self, request_id: str, member: int | None = None) -> int:
        """Drop one member's shard of a request (every member's when `member` is None); returns the
        keys deleted (0 if unreachable). Each ring member drops its own: a member still saving
        would otherwise write its increment back after another member's delete."""

        async def drop(client: Redis) -> int:
            if member is None:
                members = [int(m) for m in await client.smembers(members_key(request_id))]
            else:
                members = [member]
            if not members:
                return 0
            keys = []
            for m in members:
                entries = [json.loads(e) for e in await client.lrange(positions_key(request_id, m), 0, -1)]
                keys.append(positions_key(request_id, m))
                keys += [blob_key(request_id, m, layer, e["seq"]) for e in entries for layer in range(e["layers"])]
            pipe = client.pipeline(transaction=True)
            pipe.delete(*keys)
            pipe.srem(members_key(request_id), *members)  # Redis drops the set with its last member
            deleted, _ = await pipe.execute()
            return deleted

        return await self.nodes.call(self._node(request_id), drop, 0)

    async def close(self) -> None:
        await self.nodes.close()


def _encode_layers(keys: Sequence[Tensor], values: Sequence[Tensor], group: int) -> list[bytearray]:
    return [encode_block(quantize_kv(k, v, SHARD_QUANT, group)) for k, v in zip(keys, values)]


def _assemble(
    entries: list[dict], blobs: list[bytes | None], dtype: torch.dtype | None, device: torch.device | str
) -> Shard:
    """Increments in the order they were written -> one Shard; raises CorruptBlock."""
    layers = {entry["layers"] for entry in entries}
    if len(layers) != 1 or any(b is None for b in blobs):
        raise CorruptBlock("an increment of the shard is missing or has another layer count")
    num_layers = layers.pop()
    keys: list[list[Tensor]] = [[] for _ in range(num_layers)]
    values: list[list[Tensor]] = [[] for _ in range(num_layers)]
    for i, blob in enumerate(blobs):
        k, v = dequantize_kv(decode_block(blob), dtype, device)
        keys[i % num_layers].append(k)
        values[i % num_layers].append(v)
    runs: list[Run] = []
    for entry in entries:
        for start, end in entry["runs"]:
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
    shard = Shard(runs, [torch.cat(k) for k in keys], [torch.cat(v) for v in values])
    if any(k.shape[0] != shard.tokens for k in shard.keys) or shard.tokens != sum(e - s for s, e in runs):
        raise CorruptBlock(f"{shard.tokens} rows for {sum(e - s for s, e in runs)} positions")
    return shard
