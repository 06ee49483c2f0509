"""The worker's side of the KV store: block bytes straight to and from Redis, never over NATS.

Writes quantize and encode blocks off the event loop, then send them in pipelines grouped by
Redis node (consistent hashing of the key), at most `kv_io_concurrency` pipelines in flight.
Reads check the in-process hot cache first, fetch the rest the same way (GETEX also renews each
block's TTL), and drop any block that fails to decode: a corrupt block is deleted and reported as
a miss. A hot-cache hit sends nothing to Redis, and need not: blocks are only read for a request
whose lookup has just found them, and the kvstore renews the TTL of every block a lookup or pin
finds (services/kvstore/service.py), so one place renews, with no traffic per hot hit. An
unreachable Redis turns into misses and zero bytes written (see nodes.py).

The kvstore service owns the metadata; after writing all layers of some blocks the worker tells
it with `KVIndexClient.commit` (client.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
import torch
from opentelemetry.metrics import Meter
from redis.asyncio import Redis
from torch import Tensor

from shared.kv.block import CorruptBlock, decode_block, encode_block
from shared.kv.hot_cache import HotCache
from shared.kv.keys import BlockRef, KVBlockKey
from shared.kv.metrics import StoreMetrics
from shared.kv.nodes import RedisNodes
from shared.kv.quant import QUANT_MODES, QuantizedKV, dequantize_kv, quantize_kv
from shared.settings import Settings

log = structlog.get_logger("kv")
T = TypeVar("T")

# One pipeline carries at most this many blocks: bounded memory and latency per round trip.
PIPELINE_MAX_KEYS = 32
# Floor of a measured duration, so a rate is never a division by zero.
MIN_SECONDS = 1e-9

Slot = tuple[int, int]  # (layer, block index)
PutItem = tuple[int, BlockRef, Tensor, Tensor]  # (layer, ref, k [b, kv_heads, d], v [b, kv_heads, d])


class KVBlockStore:
    def __init__(self, settings: Settings, meter: Meter | None = None, hot_node: str = "hot"):
        """`hot_node`: the metrics' `node` label of this process's hot cache (a worker: `hot:<its id>`)."""
        self.settings = settings
        self.nodes = RedisNodes.from_settings(settings)
        self.hot = HotCache(settings.kv_hot_cache_bytes)
        self.hot_node = hot_node
        self.metrics = StoreMetrics(meter)
        self._io = asyncio.Semaphore(settings.kv_io_concurrency)

    @staticmethod
    def key(model_id: str, layer: int, ref: BlockRef, quant: str) -> str:
        return KVBlockKey(model_id, layer, ref.chain_hash, quant).redis_key()

    # ---- writes -------------------------------------------------------------------------------

    async def put_block(self, model_id: str, layer: int, ref: BlockRef, k: Tensor, v: Tensor, quant: str) -> int:
        """Store one layer of one block; returns the bytes written (0 if Redis is unreachable)."""
        return await self.put_blocks([(layer, ref, k, v)], model_id, quant)

    async def put_blocks(self, items: list[PutItem], model_id: str, quant: str) -> int:
        """Store many (layer, ref, k, v) in pipelines; returns the bytes that reached Redis (less than
        all of them if a node was unreachable: the kvstore's lookup checks bytes before claiming blocks)."""
        _check_quant(quant)
        if not items:
            return 0
        started = time.perf_counter()
        keyed = [(self.key(model_id, layer, ref, quant), (layer, ref, k, v)) for layer, ref, k, v in items]
        batches = _batches(keyed, lambda item: item[0], self.nodes, self.settings.kv_io_concurrency)
        written = sum(await asyncio.gather(*(self._store(node, batch, quant) for node, batch in batches)))
        if written:
            self.metrics.bytes_written.add(written, {"quant": quant})
            rate = written / max(time.perf_counter() - started, MIN_SECONDS)
            self.metrics.throughput.record(rate, {"op": "store", "quant": quant})
        return written

    async def _store(self, node: int, batch: list[tuple[str, PutItem]], quant: str) -> int:
        # Each batch is encoded (in a thread) while other batches are already on the wire.
        encoded = await asyncio.to_thread(self._encode, batch, quant)
        for key, q, _ in encoded:
            self.hot.put(key, q)
        return await self._write(node, [(key, data) for key, _, data in encoded])

    def _encode(self, batch: list[tuple[str, PutItem]], quant: str) -> list[tuple[str, QuantizedKV, bytearray]]:
        out = []
        for key, (_, ref, k, v) in batch:
            if k.shape[0] != ref.end - ref.start:
                raise ValueError(f"block {ref.index} spans {ref.end - ref.start} tokens but k has {k.shape[0]}")
            q = quantize_kv(k, v, quant, self.settings.kv_group_size)
            out.append((key, q.compact(), encode_block(q)))  # compact: the hot cache keeps it
        return out

    async def _write(self, node: int, batch: list[tuple[str, bytearray]]) -> int:
        ttl = self.settings.kv_ttl_s

        async def write(client: Redis) -> int:
            pipe = client.pipeline(transaction=False)
            for key, data in batch:
                pipe.set(key, data, ex=ttl)
            await pipe.execute()
            return sum(len(data) for _, data in batch)

        async with self._io:
            return await self.nodes.call(node, write, 0)

    # ---- reads --------------------------------------------------------------------------------

    async def get_blocks(
        self,
        model_id: str,
        refs: Sequence[BlockRef],
        layers: Sequence[int],
        quant: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> dict[Slot, tuple[Tensor, Tensor]]:
        """Load every (layer, block) asked for -> {(layer, ref.index): (k, v)} in `dtype` on `device`,
        each [block tokens, kv_heads, head_dim]. Misses (absent, corrupt, unreachable) are left out."""
        _check_quant(quant)
        started = time.perf_counter()
        hot: dict[Slot, QuantizedKV] = {}
        remote: list[tuple[Slot, str]] = []
        for layer in layers:
            for ref in refs:
                key = self.key(model_id, layer, ref, quant)
                q = self.hot.get(key)
                if q is not None:
                    hot[(layer, ref.index)] = q
                else:
                    remote.append(((layer, ref.index), key))

        batches = _batches(remote, lambda item: item[1], self.nodes, self.settings.kv_io_concurrency)
        # Each batch is decoded as soon as it arrives, while other batches are still on the wire.
        results = await asyncio.gather(
            asyncio.to_thread(_dequantize_all, hot, dtype, device),
            *(self._load(node, batch, dtype, device) for node, batch in batches),
        )
        out, loaded = results[0], results[1:]
        corrupt = [key for batch in loaded for key in batch.corrupt]
        for batch in loaded:
            for key, q in batch.blocks.items():
                self.hot.put(key, q)
            out.update(batch.tensors)
        if corrupt:
            await self._drop(corrupt)

        self._record_reads(len(hot), len(remote), [(node, batch) for (node, _), batch in zip(batches, loaded)])
        read_bytes = sum(batch.nbytes for batch in loaded)
        if read_bytes:
            self.metrics.bytes_read.add(read_bytes, {"quant": quant})
            rate = read_bytes / max(time.perf_counter() - started, MIN_SECONDS)
            self.metrics.throughput.record(rate, {"op": "load", "quant": quant})
        return out

    def _record_reads(self, hot: int, remote: int, loaded: list[tuple[int, "_LoadedBatch"]]) -> None:
        """Block outcomes and hits/misses per node: the hot cache (when it is on: every block asked
        of it), then each Redis node (the blocks it was asked for; corrupt ones count as misses)."""
        if self.hot.max_bytes > 0:
            self.metrics.lookup(hot, remote, self.hot_node)
            self.metrics.blocks("hot", hot, self.hot_node)
        per_node: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # asked, hit, corrupt
        for node, batch in loaded:
            counts = per_node[node]
            counts[0] += batch.asked
            counts[1] += len(batch.tensors)
            counts[2] += len(batch.corrupt)
        for node, (asked, hit, corrupt) in per_node.items():
            label = self.nodes.labels[node]
            self.metrics.lookup(hit, asked - hit, label)
            self.metrics.blocks("hit", hit, label)
            self.metrics.blocks("miss", asked - hit - corrupt, label)
            self.metrics.blocks("corrupt", corrupt, label)

    async def _load(
        self, node: int, batch: list[tuple[Slot, str]], dtype: torch.dtype, device: torch.device | str
    ) -> "_LoadedBatch":
        fetched = await self._read(node, batch)
        loaded = await asyncio.to_thread(_decode_batch, fetched, dtype, device)
        loaded.asked = len(batch)  # fetched is empty when the node is unreachable: all misses
        return loaded

    async def _read(self, node: int, batch: list[tuple[Slot, str]]) -> list[tuple[Slot, str, bytes | None]]:
        ttl = self.settings.kv_ttl_s

        async def read(client: Redis) -> list[tuple[Slot, str, bytes | None]]:
            pipe = client.pipeline(transaction=False)
            for _, key in batch:
                pipe.getex(key, ex=ttl)  # a block that is read stays alive
            values = await pipe.execute()
            return [(slot, key, data) for (slot, key), data in zip(batch, values)]

        async with self._io:
            return await self.nodes.call(node, read, [])

    async def _drop(self, keys: list[str]) -> None:
        by_node: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            by_node[self.nodes.node_for(key)].append(key)

        for node, node_keys in by_node.items():
            await self.nodes.call(node, lambda client, node_keys=node_keys: client.delete(*node_keys), 0)

    async def close(self) -> None:
        await self.nodes.close()


def _check_quant(quant: str) -> None:
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown kv quant mode {quant!r}; expected one of {QUANT_MODES}")


def _by_node(items: list[T], key_of: Callable[[T], str], nodes: RedisNodes) -> dict[int, list[T]]:
    grouped: dict[int, list[T]] = defaultdict(list)
    for item in items:
        grouped[nodes.node_for(key_of(item))].append(item)
    return grouped


def _batches(
    items: list[T], key_of: Callable[[T], str], nodes: RedisNodes, concurrency: int
) -> list[tuple[int, list[T]]]:
    """Group items by the node of their key, then cut each group into about `concurrency`
    pipelines of at most PIPELINE_MAX_KEYS, so that several connections move bytes at once."""
    batches = []
    for node, node_items in _by_node(items, key_of, nodes).items():
        size = min(PIPELINE_MAX_KEYS, max(1, -(-len(node_items) // concurrency)))
        batches += [(node, node_items[i : i + size]) for i in range(0, len(node_items), size)]
    return batches


@dataclass
class _LoadedBatch:
    tensors: dict[Slot, tuple[Tensor, Tensor]]  # what get_blocks returns
    blocks: dict[str, QuantizedKV]  # by key, for the hot cache
    corrupt: list[str]  # keys of blocks that failed to decode
    nbytes: int  # bytes received
    asked: int = 0  # blocks asked of the node


def _decode_batch(
    fetched: list[tuple[Slot, str, bytes | None]], dtype: torch.dtype, device: torch.device | str
) -> _LoadedBatch:
    batch = _LoadedBatch({}, {}, [], 0)
    for slot, key, data in fetched:
        if data is None:
            continue
        batch.nbytes += len(data)
        try:
            q = decode_block(data)
        except CorruptBlock as exc:
            log.warning("kv_block_corrupt", key=key, error=str(exc))
            batch.corrupt.append(key)
            continue
        batch.blocks[key] = q
        batch.tensors[slot] = dequantize_kv(q, dtype, device)
    return batch


def _dequantize_all(
    found: dict[Slot, QuantizedKV], dtype: torch.dtype, device: torch.device | str
) -> dict[Slot, tuple[Tensor, Tensor]]:
    return {slot: dequantize_kv(q, dtype, device) for slot, q in found.items()}
