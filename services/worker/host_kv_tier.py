"""The prefix cache's host tier (issue 10): prompt blocks the KV pool lets go of, kept in this
worker's host memory, and copied back into pool pages when a later prompt starts with them.

Below the device tier (resident_prefix.py), above Redis: a block the device tier evicts is
copied here (every layer's K and V of its page, the pool's dtype as it is, so a hit gives the
very rows a fresh prefill wrote), least recently used blocks dropped past `capacity_bytes`.
Blocks are named by their chain hash, as in the other tiers. A block copied back stays here too
(inclusive tiers): when the pool lets go of it again there is nothing to copy.

On CUDA the blocks are in pinned memory, so both directions are DMA copies at PCIe speed; they
run on a stream of their own, after the compute stream's queued work (the rows of a page being
evicted are written, the last readers of a page being filled are done) and before its later work
(nothing reuses an evicted page, or reads a filled one, before its copy ends). On the CPU they
are plain copies. The memory is taken in segments as the tier fills, and its slots are reused:
one stream for all copies in and out keeps a slot's copy back ahead of the next copy into it.

All calls come from the compute thread, as every use of the pool's pages does.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from services.worker.kv_cache import KVPool


# Pinned memory is taken in segments of at most this many bytes, a whole number of blocks each:
# PyTorch's pinned allocator rounds every allocation up to a power of two (so this is one, and
# a segment wastes less than a block), and pinning one stalls the compute thread a few tens of
# milliseconds, once (a block of an 8B bf16 model is 32 MiB: 8 a segment).
HOST_SEGMENT_BYTES = 256 * 1024**2


class HostKVTier:
    def __init__(self, pool: KVPool, capacity_bytes: int, segment_bytes: int = HOST_SEGMENT_BYTES):
        self.pool = pool
        self.block_bytes = pool.page_bytes  # one block: its page of every layer, K and V
        self.capacity_blocks = capacity_bytes // self.block_bytes
        self.blocks_per_segment = max(1, segment_bytes // self.block_bytes)
        device = pool.k_layers.device
        self.pinned = device.type == "cuda"  # DMA both ways (a pageable copy stages through the driver)
        self.stream = torch.cuda.Stream(device) if self.pinned else None
        # chain hash -> its slot [2, L, KVH, P, d] (K, V), least recently used first
        self._blocks: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._free_slots: list[torch.Tensor] = []
        self._slots = 0  # slots taken from the host so far (never given back)
        self.stores = 0  # blocks copied in from the pool
        self.hits = 0  # blocks copied back into the pool
        self.evictions = 0  # blocks dropped, least recently used first, to stay within the capacity

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, chain_hash: str) -> bool:
        return chain_hash in self._blocks

    @property
    def bytes(self) -> int:
        """Bytes of the blocks held now."""
        return len(self._blocks) * self.block_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes of host memory taken for blocks so far (held ones and free slots)."""
        return self._slots * self.block_bytes

    def store(self, blocks: Sequence[tuple[str, int]]) -> int:
        """Copy these (chain hash, page) out of the pool, before the pages go back to it (the
        caller frees them afterwards); -> blocks copied. One held already is only touched."""
        if self.capacity_blocks == 0:
            return 0
        copied = 0
        with self._copy_stream():
            for chain_hash, page in blocks:
                if chain_hash in self._blocks:
                    self._blocks.move_to_end(chain_hash)
                    continue
                slot = self._slot()
                self.pool.copy_page_out(page, slot)
                self._blocks[chain_hash] = slot
                copied += 1
        self.stores += copied
        return copied

    def _slot(self) -> torch.Tensor:
        """Memory for one more block [2, L, KVH, P, d]: a free slot, a new segment's, or the least
        recently used block's (dropped)."""
        if not self._free_slots and self._slots < self.capacity_blocks:
            n = min(self.blocks_per_segment, self.capacity_blocks - self._slots)
            segment = torch.empty((n, *self.pool.page_shape), dtype=self.pool.k_layers.dtype, pin_memory=self.pinned)
            self._free_slots.extend(segment.unbind(0))
            self._slots += n
        if self._free_slots:
            return self._free_slots.pop()
        _, slot = self._blocks.popitem(last=False)
        self.evictions += 1
        return slot

    def get(self, chain_hash: str) -> torch.Tensor | None:
        """The block [2, L, KVH, P, d] if held (no use recorded: see `touch`). Its slot is the
        next store's once the block is dropped: `load` it before anything is stored."""
        return self._blocks.get(chain_hash)

    def touch(self, chain_hash: str) -> None:
        """The block was used: the most recently used now."""
        self._blocks.move_to_end(chain_hash)

    def load(self, blocks: Sequence[torch.Tensor], pages: Sequence[int]) -> None:
        """Copy blocks (from `get`) into these freshly allocated pool pages, block i into pages[i].
        Work the compute stream queues afterwards sees the rows."""
        with self._copy_stream():
            for host, page in zip(blocks, pages, strict=True):
                self.pool.copy_page_in(host, page)
        self.hits += len(pages)

    @contextlib.contextmanager
    def _copy_stream(self) -> Iterator[None]:
        """Copies queued inside run on the tier's stream, between the compute stream's work
        queued before and after (on the CPU: plain copies, in order)."""
        if self.stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            yield
        compute.wait_stream(self.stream)
