"""The worker's KV store I/O on an event loop of its own thread.

Storing a prompt's blocks and copying decode shards is many callbacks: pipelines of MB-sized
values, their replies, encodes handed to threads. On the worker's main loop they queued ahead of
the decode loop's turn between two steps, so the compute thread sat idle waiting for the next
step (an H200 profile, docs/PERFORMANCE.md). Here the stores' Redis connections live on a second
loop, in a thread of its own: the main loop only hands a call over and gets its result.

Only Redis traffic moves: the kvstore's NATS requests (commits, shard budget) stay on the main
loop, which owns the NATS connection; a shard save's `reserve` callback is called back there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from shared.kv.keys import BlockRef
from shared.kv.shards import ShardStore
from shared.kv.store import KVBlockStore, PutItem, Slot
from shared.positions import Run

T = TypeVar("T")


class IOLoop:
    """An asyncio event loop running in a daemon thread; `run` awaits a coroutine on it."""

    def __init__(self, executor_threads: int, name: str = "kv-io-loop"):
        self.loop = asyncio.new_event_loop()
        # asyncio.to_thread on this loop (block encodes and decodes): a few threads at most
        self.loop.set_default_executor(ThreadPoolExecutor(max_workers=executor_threads,
                                                          thread_name_prefix=f"{name}-x"))
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """The result of `coro`, run on this loop, awaited from another one."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        """Stop the loop and its thread (its executor first, on the loop itself), from another loop."""
        await self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join)
        self.loop.close()


def on_caller_loop(fn: Callable[[int], Awaitable[bool]]) -> Callable[[int], Awaitable[bool]]:
    """`fn` (a coroutine function of the calling loop, e.g. a NATS request) made callable from
    the I/O loop: each call runs on the loop that is running now."""
    caller = asyncio.get_running_loop()

    async def call(nbytes: int) -> bool:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(nbytes), caller))

    return call


class IOLoopBlockStore:
    """A KVBlockStore whose Redis calls run on the I/O loop (PrefixCache uses these methods)."""

    def __init__(self, store: KVBlockStore, io: IOLoop):
        self.store = store
        self.io = io
        self.metrics = store.metrics  # thread-safe (OpenTelemetry instruments)

    async def put_blocks(self, items: list[PutItem], model_id: str, quant: str) -> int:
        return await self.io.run(self.store.put_blocks(items, model_id, quant))

    async def get_blocks(self, model_id: str, refs: Sequence[BlockRef], layers: Sequence[int], quant: str,
                         dtype: torch.dtype, device: torch.device | str) -> dict[Slot, tuple[torch.Tensor, torch.Tensor]]:
        return await self.io.run(self.store.get_blocks(model_id, refs, layers, quant, dtype, device))

    async def close(self) -> None:
        await self.io.run(self.store.close())


class IOLoopShardStore:
    """A ShardStore whose Redis calls run on the I/O loop (ShardPersister uses these methods)."""

    def __init__(self, store: ShardStore, io: IOLoop):
        self.store = store
        self.io = io

    async def save_increment(self, request_id: str, member: int, seq: int, runs: Sequence[Run],
                             keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                             reserve: Callable[[int], Awaitable[bool]] | None = None) -> bool:
        hop = on_caller_loop(reserve) if reserve is not None else None
        return await self.io.run(self.store.save_increment(request_id, member, seq, runs, keys, values, reserve=hop))

    async def delete(self, request_id: str, member: int | None = None) -> int:
        return await self.io.run(self.store.delete(request_id, member))

    async def close(self) -> None:
        await self.io.run(self.store.close())
