"""The worker's KV cache: one preallocated pool of fixed-size pages per layer, and per request the
list of pages that hold its rows (PagedAttention's block table).

Rows of a request are in the order the worker received its tokens (its prompt segments, then the
decode tokens appended to it); row r lives in page `pages[r // page_tokens]`, slot
`r % page_tokens`. Decode attention needs no positions because a new token sees every cached key.

A request that attends through a window in every layer (shared/attention/kv_need.py) gives back
the pages behind it as it advances (`free_behind`): their entries in its block table become the
scratch page, so the table keeps its length and row r stays in entry r // page_tokens. No kernel
reads those entries: every attention over the pool starts at the row's window start (the paged
decode kernel's first page is seq_start // page_tokens; the SDPA and reference paths mask or skip
rows below it; sink rows sit in pages that are kept).

The pool's storage never moves on CUDA (its addresses are baked into the decode step's CUDA
graphs); on the CPU it may grow. Page 0 is a scratch page that is never handed out: rows of a
batch that append nothing (padding, a ring member that does not hold the new token) write there.

Threads: the compute thread allocates, writes and frees; the event loop reads finished rows (prefix
stores, shard copies) while it holds the sequence (`held()`), so its pages are not reused under it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.attention.paged import gather_rows
from shared.positions import runs_of_rows
from shared.settings import Settings

SCRATCH_PAGE = 0
CPU_GROWTH = 2  # a CPU pool that runs out of pages grows by this factor
DEFAULT_COPY_CHUNK_BYTES: int = Settings.model_fields["kv_io_copy_chunk_bytes"].default  # the worker passes its own


class KVPoolFull(RuntimeError):
    """The pool has no free page left for a request (placement should have prevented it)."""


class KVPool:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, page_tokens: int, pages: int,
                 dtype: torch.dtype, device: torch.device, growable: bool = False, max_pages: int | None = None,
                 copy_chunk_bytes: int = DEFAULT_COPY_CHUNK_BYTES):
        self.page_tokens = page_tokens
        self.growable = growable
        self.max_pages = max_pages  # a growable pool's limit (None: none)
        shape = (max(pages, 1) + 1, kv_heads, page_tokens, head_dim)  # + the scratch page
        # k_layers, v_layers: [L, pages, KVH, page_tokens, d], one tensor each, so that a copy of
        # rows to the host takes a few operations for all layers; k[layer], v[layer] are views
        self.k_layers = torch.zeros((num_layers, *shape), dtype=dtype, device=device)
        self.v_layers = torch.zeros((num_layers, *shape), dtype=dtype, device=device)
        self.k, self.v = list(self.k_layers.unbind(0)), list(self.v_layers.unbind(0))
        self._free = list(range(shape[0] - 1, SCRATCH_PAGE, -1))  # popped from the end: low ids first
        self._extra_refs: dict[int, int] = {}  # page -> holders beyond the first (shared pages)
        # reclaim(n): free up to n pages that are kept but not needed (resident prefix blocks)
        self.reclaim: Callable[[int], int] | None = None
        self._lock = threading.Lock()
        # Copies to the host (prefix stores, shard copies) run on their own stream, beside the
        # compute stream, instead of queueing behind (and between) prefill and decode work.
        self.io_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copy_chunk_bytes = copy_chunk_bytes  # see rows_to_host

    @classmethod
    def for_model(cls, config, page_tokens: int, pages: int, dtype: torch.dtype, device: torch.device,
                  growable: bool = False, max_pages: int | None = None,
                  copy_chunk_bytes: int = DEFAULT_COPY_CHUNK_BYTES) -> "KVPool":
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, page_tokens, pages,
                   dtype, device, growable, max_pages, copy_chunk_bytes)

    @property
    def pages(self) -> int:
        """Pages that can be handed out (the scratch page excluded)."""
        return self.k[0].shape[0] - 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.page_tokens)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free) and self.reclaim is not None:  # kept prefix blocks make room first
            self.reclaim(n - len(self._free))
        with self._lock:
            if n > len(self._free):
                need = self.pages + n - len(self._free)
                if not self.growable or (self.max_pages is not None and need > self.max_pages):
                    raise KVPoolFull(f"KV pool full: {n} pages asked, {len(self._free)} of {self.pages} free")
                self._grow(need)
            taken = self._free[-n:] if n else []
            del self._free[len(self._free) - n:]
            return taken[::-1]

    def free(self, pages: list[int]) -> None:
        """One holder lets go of these pages: back to the free list once nobody else holds them."""
        with self._lock:
            last = []
            for p in pages:
                extra = self._extra_refs.get(p, 0)
                if extra:
                    self._extra_refs[p] = extra - 1
                    if extra == 1:
                        del self._extra_refs[p]
                else:
                    last.append(p)
            self._free.extend(sorted(last, reverse=True))

    def retain(self, pages: list[int]) -> None:
        """Another holder of these (allocated) pages: each `free` of them lets go of one holder.
        How prefix blocks stay in the pool after their request, and are shared by later ones."""
        with self._lock:
            for p in pages:
                self._extra_refs[p] = self._extra_refs.get(p, 0) + 1

    def _grow(self, at_least: int) -> None:
        old = self.k[0].shape[0]
        new = max(old * CPU_GROWTH, at_least + 1)
        if self.max_pages is not None:
            new = min(new, self.max_pages + 1)  # + the scratch page
        grown = []
        for layers in (self.k_layers, self.v_layers):
            bigger = torch.zeros((layers.shape[0], new, *layers.shape[2:]), dtype=layers.dtype, device=layers.device)
            bigger[:, :old] = layers
            grown.append(bigger)
        self.k_layers, self.v_layers = grown
        self.k, self.v = list(self.k_layers.unbind(0)), list(self.v_layers.unbind(0))
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    # ---- rows ------------------------------------------------------------------------------
    def write(self, layer: int, pages: list[int], first_row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, KVH, d] become rows [first_row, first_row + n) of a sequence with these pages."""
        if k.shape[0] == 0:
            return
        device = self.k[layer].device
        rows = torch.arange(first_row, first_row + k.shape[0], device=device)
        page = torch.tensor(pages, dtype=torch.long, device=device)[rows // self.page_tokens]
        slot = rows % self.page_tokens
        self.k[layer][page, :, slot] = k.to(self.k[layer].dtype)
        self.v[layer][page, :, slot] = v.to(self.v[layer].dtype)

    def read_keys(self, layer: int, pages: list[int], lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of K as a contiguous copy [hi - lo, KVH, d]."""
        return gather_rows(self.k[layer], pages, lo, hi)

    def read_values(self, layer: int, pages: list[int], lo: int, hi: int) -> torch.Tensor:
        return gather_rows(self.v[layer], pages, lo, hi)

    def read_all_layers(self, pages: list[int], lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi) of every layer: (k, v), each [L, hi - lo, KVH, d] (views where it can)."""
        first, last = lo // self.page_tokens, -(-hi // self.page_tokens)
        ids = torch.tensor(pages[first:last], dtype=torch.long).to(self.k_layers.device)
        out = []
        for layers in (self.k_layers, self.v_layers):
            n, _, kv_heads, page, dim = layers.shape
            rows = layers[:, ids].transpose(2, 3).reshape(n, -1, kv_heads, dim)  # [L, pages * P, KVH, d]
            out.append(rows[:, lo - first * page : hi - first * page])
        return out[0], out[1]

    # ---- whole pages, every layer (the prefix cache's host tier) ---------------------------
    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page of every layer, K and V: [2, L, KVH, page_tokens, d]."""
        layers, _, kv_heads, page, dim = self.k_layers.shape
        return (2, layers, kv_heads, page, dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of every layer, K and V."""
        return math.prod(self.page_shape) * self.k_layers.element_size()

    @torch.inference_mode()
    def copy_page_out(self, page: int, dst: torch.Tensor) -> None:
        """dst [2, L, KVH, P, d] (K, V) <- the page's rows in every layer, the pool's dtype as it is.

        Queued on the current stream (non_blocking: into pinned memory it is a DMA the caller
        orders with its streams). A page of all layers is strided in the pool (one page per layer
        apart), so each copy gathers into a contiguous device temporary first: copies of
        copy_chunk_bytes, a few layers at a time, bound those temporaries."""
        for side, layers in enumerate((self.k_layers, self.v_layers)):
            for first, last in self._layer_pieces():
                dst[side, first:last].copy_(layers[first:last, page], non_blocking=True)

    @torch.inference_mode()
    def copy_page_in(self, src: torch.Tensor, page: int) -> None:
        """The page's rows in every layer <- src [2, L, KVH, P, d] (copy_page_out's layout)."""
        for side, layers in enumerate((self.k_layers, self.v_layers)):
            for first, last in self._layer_pieces():
                layers[first:last, page].copy_(src[side, first:last], non_blocking=True)

    def _layer_pieces(self) -> list[tuple[int, int]]:
        """[first, last) layer ranges of at most copy_chunk_bytes of one page (at least a layer)."""
        layers = self.k_layers.shape[0]
        layer_bytes = self.page_bytes // (2 * layers)
        step = max(1, self.copy_chunk_bytes // max(layer_bytes, 1))
        return [(first, min(first + step, layers)) for first in range(0, layers, step)]

    @property
    def bytes_per_token(self) -> int:
        k = self.k[0]
        return 2 * len(self.k) * k.shape[1] * k.shape[3] * k.element_size()


@dataclass
class RequestKV:
    """One request's rows on this worker: its pages in the pool, and what the rows are."""

    request_id: str
    member: int  # this worker's index in the request's ring
    pool: KVPool
    pages: list[int] = field(default_factory=list)
    tokens: int = 0  # rows written
    positions: list[tuple[int, int]] = field(default_factory=list)  # [start, end) runs held, in row order
    # attention mass each row received on sampled decode steps, summed over layers (H2O importance)
    mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    observed: int = 0  # decode steps whose attention mass was measured (one layer each, in turn)
    freed_pages: int = 0  # pages given back behind the window (their entries: the scratch page)
    _live_from: int = 0  # entries below this one, sink pages apart, are given back already
    _holders: int = 0
    _freed: bool = False

    # ---- growth (compute thread) ----------------------------------------------------------
    def reserve(self, rows: int) -> None:
        """Pages for `rows` rows in all (allocated ahead of the writes)."""
        need = self.pool.pages_for(rows) - len(self.pages)
        if need > 0:
            self.pages.extend(self.pool.alloc(need))

    def next_slot(self) -> tuple[int, int]:
        """(page, slot) of the next row, its page allocated if needed."""
        self.reserve(self.tokens + 1)
        return self.pages[self.tokens // self.pool.page_tokens], self.tokens % self.pool.page_tokens

    def extend(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Append rows to every layer: keys[layer], values[layer]: [n, KVH, d]."""
        n = keys[0].shape[0]
        self.reserve(self.tokens + n)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.pool.write(layer, self.pages, self.tokens, k, v)
        self.tokens += n

    def free_behind(self, first_needed_row: int, sink_rows: int = 0) -> int:
        """Give back the pages whose rows all lie before `first_needed_row` (behind the window of
        every query to come) and hold none of the first `sink_rows` rows (attention sinks, kept).
        Only this request's hold is dropped: a page another holder shares (a resident prefix
        block) stays in the pool for it. Deferred while a reader on another thread holds the rows
        (`acquire`): it reads them through these entries; the next call catches up.
        -> pages given back now."""
        page = self.pool.page_tokens
        sink_pages = -(-sink_rows // page)  # entries from here on hold no sink row
        end = min(first_needed_row // page, len(self.pages))  # entries below it are wholly behind
        with self.pool._lock:
            start = max(self._live_from, sink_pages)
            if self._freed or self._holders or end <= start:
                return 0
            behind = [p for p in self.pages[start:end] if p != SCRATCH_PAGE]
            self.pages[start:end] = [SCRATCH_PAGE] * (end - start)
            self._live_from = end
        self.pool.free(behind)
        self.freed_pages += len(behind)
        return len(behind)

    @property
    def held_tokens(self) -> int:
        """Rows written whose pages this request still holds (what it costs the pool)."""
        return self.tokens - self.freed_pages * self.pool.page_tokens

    def note_positions(self, start: int, end: int) -> None:
        if self.positions and self.positions[-1][1] == start:
            self.positions[-1] = (self.positions[-1][0], end)
        else:
            self.positions.append((start, end))

    def rows_through(self, position: int) -> int:
        """Rows holding positions <= `position` (rows ascend in position: a member's segments do,
        and decode rows come after them)."""
        return sum(max(0, min(e, position + 1) - s) for s, e in self.positions)

    def next_observed_layer(self, layers: int) -> int:
        """The layer whose attention mass this request's next observed step measures."""
        layer = self.observed % layers
        self.observed += 1
        return layer

    def add_mass(self, mass: torch.Tensor) -> None:
        """mass: [rows] for the first rows (a prefix of the cache, which only grows)."""
        mass = mass.detach().float().cpu()
        if mass.shape[0] > self.mass.shape[0]:
            self.mass = torch.cat([self.mass, torch.zeros(mass.shape[0] - self.mass.shape[0])])
        self.mass[: mass.shape[0]] += mass

    # ---- reads -----------------------------------------------------------------------------
    def keys(self, layer: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return self.pool.read_keys(layer, self.pages, lo, self.tokens if hi is None else hi)

    def values(self, layer: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return self.pool.read_values(layer, self.pages, lo, self.tokens if hi is None else hi)

    def rows_to_host(self, lo: int, hi: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Rows [lo, hi) of every layer, in host memory: (keys[layer], values[layer]) [hi - lo, KVH, d].

        Blocking: call it in a thread (asyncio.to_thread), never on the event loop. A handful of
        operations for all layers: each one lets the GIL go and takes it back, which the compute
        thread feels. On CUDA the gathers and copies run on the pool's I/O stream, so they wait for
        nothing the compute thread queued; the rows must be finished ones (a prefill's, decode
        rows of ended steps), which is all `tokens` counts. The caller holds the request (`acquire`)."""
        io = self.pool.io_stream
        if io is None:
            k, v = self.pool.read_all_layers(self.pages, lo, hi)
            return list(k.clone().unbind(0)), list(v.clone().unbind(0))
        with torch.cuda.stream(io):
            k, v = self.pool.read_all_layers(self.pages, lo, hi)
            # into pinned memory by DMA (a pageable copy stages through the driver, which stalls
            # the compute thread's launches meanwhile), a few layers at a time: the copy engine
            # serves copies in turn, and the decode step's token copy must not queue behind 100s of MB
            host = torch.empty((2, *k.shape), dtype=k.dtype, pin_memory=True)
            layers = max(1, self.pool.copy_chunk_bytes // max(k[0].numel() * k.element_size(), 1))
            for side, rows in enumerate((k, v)):
                for first in range(0, rows.shape[0], layers):
                    host[side, first : first + layers].copy_(rows[first : first + layers], non_blocking=True)
                    io.synchronize()
        return list(host[0].unbind(0)), list(host[1].unbind(0))

    @property
    def num_layers(self) -> int:
        return len(self.pool.k)

    def runs_of_rows(self, first: int, end: int) -> list[tuple[int, int]]:
        """The positions of rows [first, end), as runs."""
        return runs_of_rows(self.positions, first, end)

    # ---- lifetime --------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Hold the rows for a reader on another thread: the pages are not given back to the pool
        until `unacquire`. False when the request was already freed (nothing to read)."""
        with self.pool._lock:
            if self._freed:
                return False
            self._holders += 1
            return True

    def unacquire(self) -> None:
        with self.pool._lock:
            self._holders -= 1
            give_back = self._freed and self._holders == 0
        if give_back:
            self._give_back()

    def free(self) -> None:
        """The request is done here: its pages go back to the pool once no reader holds them."""
        with self.pool._lock:
            if self._freed:
                return
            self._freed = True
            give_back = self._holders == 0
        if give_back:
            self._give_back()

    def _give_back(self) -> None:
        pages, self.pages = self.pages, []
        self.pool.free([p for p in pages if p != SCRATCH_PAGE])  # entries behind the window: given back


@dataclass
class CachedRows:
    """A member's K/V of the prompt positions below `upto`, loaded instead of computed: its first
    rows (a member's segments ascend, so positions below `upto` come first)."""

    upto: int
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, head_dim]
    values: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[0]
