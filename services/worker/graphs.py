"""The decode step of requests held by one worker, captured in CUDA graphs: one graph per batch-size
bucket (1, 2, 4, ... decode_max_batch), all replaying `step.decode_forward` and greedy sampling over
static buffers, so a step costs one graph launch instead of a thousand kernel launches.

Each bucket has a second graph that also records every layer's queries, for the steps that
measure H2O importance (`Recording`); the importance pass then runs on those, after the replay.
Captured once, when the worker starts (before it takes requests), in one memory pool shared by
the graphs. A step is three operations on the host: one copy of its packed inputs from pinned
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
from services.worker.step import DecodeInputs, Recording, decode_forward

WARMUP_RUNS = 2  # eager runs on the capture stream first: kernels compiled, workspaces allocated
# Rows of the packed input buffer [FIELDS + max_pages, max_batch] int32, then the block table.
IDS, POSITIONS, PAGE, SLOT, SEQ_LEN, WINDOW_START, FULL_LAYER_START, FIELDS = range(8)


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
        # every layer's queries of a recording step: [L, max_batch, H, d]
        config = model.config
        self._queries = torch.zeros(len(pool.k), self.max_batch, config.num_attention_heads, config.head_dim,
                                    dtype=pool.k[0].dtype, device=device)
        # (batch bucket, recording) -> (graph, its logits [bucket, vocab])
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._last_width = self.max_pages
        self._capture_all(buckets_up_to(self.max_batch))

    def inputs(self, b: int, width: int | None = None) -> DecodeInputs:
        """The first b rows of the static inputs, block tables cut to `width` pages (None: all)."""
        p = self._packed
        end = FIELDS + (self.max_pages if width is None else width)
        return DecodeInputs(ids=p[IDS, :b], positions=p[POSITIONS, :b], write_page=p[PAGE, :b], write_slot=p[SLOT, :b],
                            block_table=p[FIELDS:end, :b].t(), seq_lens=p[SEQ_LEN, :b],
                            window_starts=p[WINDOW_START, :b], full_layer_starts=p[FULL_LAYER_START, :b])

    def last_inputs(self, n: int) -> DecodeInputs:
        """The inputs of the last step's n rows, block tables as wide as its longest row's."""
        return self.inputs(n, self._last_width)

    def recorded(self, b: int) -> Recording:
        """The queries the last recording step kept of its first b rows."""
        return Recording(q=self._queries[:, :b])

    def _forward(self, b: int, record: bool) -> torch.Tensor:
        x = self.inputs(b)
        cos, sin = self.model.rope_static(x.positions)
        recording = self.recorded(b) if record else None
        logits = self.model.logits(decode_forward(self.model, self.pool, x, cos, sin, record=recording))  # [b, vocab]
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
                for record in (False, True):
                    for _ in range(WARMUP_RUNS):
                        self._forward(b, record)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                        logits = self._forward(b, record)
                    self.graphs[(b, record)] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def fits(self, pages: list[list[int]]) -> bool:
        return len(pages) <= self.max_batch and max(len(p) for p in pages) <= self.max_pages

    def run(self, steps: list[DecodeStep], pages: list[list[int]], slots: list[tuple[int, int]],
            seq_lens: list[int], window_starts: list[int], full_layer_starts: list[int], record: bool = False,
            ) -> tuple[torch.Tensor, list[int], list[float]]:
        """(logits [n, vocab] float32 on the device, greedy token of each row, its log-probability):
        one host synchronisation, for the greedy results. With `record`, the step's queries stay
        in `recorded(n)` until the next step. Rows of sliding requests fit (their window starts);
        hybrid and strided ones, whose sink and strided rows vary in number, run eager."""
        n = len(steps)
        b = next(size for size, _ in sorted(self.graphs) if size >= n)
        width = max(len(p) for p in pages)
        host = self._host
        host[:FIELDS, :n] = torch.tensor([[s.token_id for s in steps], [s.position for s in steps],
                                          [page for page, _ in slots], [slot for _, slot in slots], seq_lens,
                                          window_starts, full_layer_starts], dtype=torch.int32)
        host[PAGE, n:b] = SCRATCH_PAGE  # padding rows
        host[SEQ_LEN, n:b] = 0
        host[WINDOW_START, n:b] = 0
        host[FULL_LAYER_START, n:b] = 0
        host[FIELDS : FIELDS + width, :n] = torch.tensor([p + [SCRATCH_PAGE] * (width - len(p)) for p in pages],
                                                         dtype=torch.int32).t()
        self._packed[: FIELDS + width].copy_(host[: FIELDS + width], non_blocking=True)  # contiguous rows
        self._last_width = width
        graph, logits = self.graphs[(b, record)]
        graph.replay()
        self._greedy_host[:, :n].copy_(self._greedy[:, :n])  # waits for the replay
        tokens, logprobs = self._greedy_host[:, :n].tolist()
        return logits[:n], [int(t) for t in tokens], logprobs
