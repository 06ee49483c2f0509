"""The decode step of requests held by one worker, captured in CUDA graphs: one graph per batch-size
bucket (1, 2, 4, ... decode_max_batch), all replaying `step.decode_forward` and greedy sampling over
static buffers, so a step costs one graph launch instead of a thousand kernel launches.

Captured once, when the worker starts (before it takes requests), in one memory pool shared by
the buckets. A step is three operations on the host: one copy of its packed inputs from pinned
memory, the replay of the smallest bucket that holds it (padding rows attend over nothing and
write the scratch page), and one copy of the greedy tokens and their log-probabilities back.
Few operations matter beyond their cost: each one lets the GIL go, and a busy thread beside
(KV stores) may hold it a switch interval before giving it back.
"""

from __future__ import annotations

import torch

from shared.messages import DecodeStep
from shared.settings import Settings
from services.worker.kv_cache import SCRATCH_PAGE, KVPool
from services.worker.step import DecodeInputs, decode_forward

WARMUP_RUNS = 2  # eager runs on the capture stream first: kernels compiled, workspaces allocated
# Rows of the packed input buffer [FIELDS + max_pages, max_batch] int32, then the block table.
IDS, POSITIONS, PAGE, SLOT, SEQ_LEN, FIELDS = range(6)


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
        shape = (FIELDS + self.max_pages, self.max_batch)
        self._packed = torch.zeros(shape, dtype=torch.int32, device=device)
        self._host = torch.zeros(shape, dtype=torch.int32).pin_memory()
        # greedy token ids (exact in float32 below 2^24) and their log-probabilities: [2, max_batch]
        self._greedy = torch.zeros(2, self.max_batch, dtype=torch.float32, device=device)
        self._greedy_host = torch.zeros(2, self.max_batch, dtype=torch.float32).pin_memory()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all(buckets_up_to(self.max_batch))

    def _forward(self, b: int) -> torch.Tensor:
        p = self._packed
        x = DecodeInputs(ids=p[IDS, :b], positions=p[POSITIONS, :b], write_page=p[PAGE, :b], write_slot=p[SLOT, :b],
                         block_table=p[FIELDS:, :b].t(), seq_lens=p[SEQ_LEN, :b])
        cos, sin = self.model.rope_static(x.positions)
        logits = self.model.logits(decode_forward(self.model, self.pool, x, cos, sin))  # [b, vocab] float32
        # greedy sampling as sample_batch does it, inside the graph
        tokens = torch.argmax(logits, dim=-1)
        self._greedy[0, :b] = tokens.float()
        self._greedy[1, :b] = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        return logits

    @torch.inference_mode()
    def _capture_all(self, buckets: list[int]) -> None:
        self._packed[PAGE].fill_(SCRATCH_PAGE)  # warm-up rows write nowhere and attend over nothing
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
            seq_lens: list[int]) -> tuple[torch.Tensor, list[int], list[float]]:
        """(logits [n, vocab] float32 on the device, greedy token of each row, its log-probability):
        one host synchronisation, for the greedy results."""
        n = len(steps)
        b = next(size for size in sorted(self.graphs) if size >= n)
        width = max(len(p) for p in pages)
        host = self._host
        host[:FIELDS, :n] = torch.tensor([[s.token_id for s in steps], [s.position for s in steps],
                                          [page for page, _ in slots], [slot for _, slot in slots], seq_lens],
                                         dtype=torch.int32)
        host[PAGE, n:b] = SCRATCH_PAGE  # padding rows
        host[SEQ_LEN, n:b] = 0
        host[FIELDS : FIELDS + width, :n] = torch.tensor([p + [SCRATCH_PAGE] * (width - len(p)) for p in pages],
                                                         dtype=torch.int32).t()
        self._packed[: FIELDS + width].copy_(host[: FIELDS + width], non_blocking=True)  # contiguous rows
        graph, logits = self.graphs[b]
        graph.replay()
        self._greedy_host[:, :n].copy_(self._greedy[:, :n])  # waits for the replay
        tokens, logprobs = self._greedy_host[:, :n].tolist()
        return logits[:n], [int(t) for t in tokens], logprobs
