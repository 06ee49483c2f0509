"""The decode step of requests held by one worker, captured in CUDA graphs: one graph per batch-size
bucket (1, 2, 4, ... decode_max_batch), all replaying `step.decode_forward` over static input
buffers, so a step costs one graph launch instead of a few hundred kernel launches.

Captured once, when the worker starts (before it takes requests), in one memory pool shared by
the buckets. A step copies its inputs into the static buffers (one small host-to-device copy per
buffer, from pinned memory), replays the smallest bucket that holds it (the padding rows attend
over nothing and write the scratch page) and reads the logits of its rows.
"""

from __future__ import annotations

import torch

from shared.messages import DecodeStep
from shared.settings import Settings
from services.worker.kv_cache import SCRATCH_PAGE, KVPool
from services.worker.step import DecodeInputs, decode_forward

WARMUP_RUNS = 2  # eager runs on the capture stream first: kernels compiled, workspaces allocated


def buckets_up_to(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, pool: KVPool, settings: Settings):
        self.model = model
        self.pool = pool
        self.max_batch = settings.decode_max_batch
        longest = settings.max_prompt_tokens + settings.max_new_tokens_limit
        self.max_pages = min(pool.pages, pool.pages_for(longest))  # block-table width
        device = pool.k[0].device
        rows = self.max_batch

        def static(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.inputs = DecodeInputs(ids=static(rows), positions=static(rows), write_page=static(rows),
                                   write_slot=static(rows), block_table=static(rows, self.max_pages, dtype=torch.int32),
                                   seq_lens=static(rows, dtype=torch.int32))
        # the same, in pinned host memory: [4, rows] (ids, positions, pages, slots), seq_lens, table
        self._host_rows = torch.zeros(4, rows, dtype=torch.long).pin_memory()
        self._host_lens = torch.zeros(rows, dtype=torch.int32).pin_memory()
        self._host_table = torch.zeros(rows, self.max_pages, dtype=torch.int32).pin_memory()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all(buckets_up_to(self.max_batch))

    def _forward(self, b: int) -> torch.Tensor:
        x = self.inputs
        sliced = DecodeInputs(ids=x.ids[:b], positions=x.positions[:b], write_page=x.write_page[:b],
                              write_slot=x.write_slot[:b], block_table=x.block_table[:b], seq_lens=x.seq_lens[:b])
        cos, sin = self.model.rope_static(sliced.positions)
        h = decode_forward(self.model, self.pool, sliced, cos, sin)
        return self.model.logits(h)  # [b, vocab] float32

    @torch.inference_mode()
    def _capture_all(self, buckets: list[int]) -> None:
        self.inputs.write_page.fill_(SCRATCH_PAGE)  # warm-up rows write nowhere and attend over nothing
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in sorted(buckets, reverse=True):  # the largest first: the others fit in its memory
                for _ in range(WARMUP_RUNS):
                    self._forward(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    logits = self._forward(b)
                self.graphs[b] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def fits(self, pages: list[list[int]]) -> bool:
        return len(pages) <= self.max_batch and max(len(p) for p in pages) <= self.max_pages

    def run(self, steps: list[DecodeStep], pages: list[list[int]], slots: list[tuple[int, int]],
            seq_lens: list[int]) -> torch.Tensor:
        """The step's logits [len(steps), vocab] float32 (no host synchronisation)."""
        n = len(steps)
        b = next(size for size in sorted(self.graphs) if size >= n)
        rows, lens, table = self._host_rows, self._host_lens, self._host_table
        rows[2, :b] = SCRATCH_PAGE
        rows[:, :n] = torch.tensor([[s.token_id for s in steps], [s.position for s in steps],
                                    [page for page, _ in slots], [slot for _, slot in slots]])
        lens[:b] = 0
        lens[:n] = torch.tensor(seq_lens, dtype=torch.int32)
        for i, p in enumerate(pages):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        x = self.inputs
        for dst, field in ((x.ids, 0), (x.positions, 1), (x.write_page, 2), (x.write_slot, 3)):
            dst[:b].copy_(rows[field, :b], non_blocking=True)
        x.seq_lens[:b].copy_(lens[:b], non_blocking=True)
        x.block_table[:n].copy_(table[:n], non_blocking=True)  # whole rows: one contiguous copy
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]
