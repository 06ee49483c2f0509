"""The instruments every ringserve service records, created from one OpenTelemetry Meter.

Instrument names are the Prometheus family names the dashboards query (a counter gets `_total`
appended on export, as Prometheus client libraries do). Latencies are histograms because people
read their percentiles; "current value" things (memory, queue depth) are observable gauges read at
scrape time, so they never drift the way an up/down counter does after a missed decrement.

    metrics = RingserveMetrics(telemetry.meter)
    metrics.record_ttft(ms=412.0)
    metrics.record_request(code="ok")
    metrics.watch_queue("pending", lambda: len(pending))
"""

from __future__ import annotations

import enum
import os
import resource
import sys
import threading
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

# Request outcome of a request that succeeded; failures use the ErrorCode values.
OK_CODE = "ok"

# Whole-request latencies (TTFT): long prompts take minutes to prefill.
MS_PER_S = 1000.0
REQUEST_LATENCY_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000)
# Per-token decode latency: tens of milliseconds when healthy.
TOKEN_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1_000, 2_500)
# One ring step or one fusion round trip: sub-millisecond on NVLink, milliseconds over TCP.
COMM_LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000)
# Fractions in [0, 1]; the top buckets are fine-grained because long causal prompts skip ~half.
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000)

# Linux reports ru_maxrss in KiB.
_RU_MAXRSS_UNIT_BYTES = 1024


def process_rss_bytes() -> int:
    """Resident memory of this process (current on Linux; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RU_MAXRSS_UNIT_BYTES


def device_memory_bytes() -> dict[str, int]:
    """Memory in use per device: allocated CUDA memory per GPU, else the process RSS as `cpu`.

    torch is only consulted when the process already imported it and initialised CUDA: a
    scrape must never be what initialises a GPU context.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}
    return {"cpu": process_rss_bytes()}


def kv_cache_lookups_counter(meter: Meter):
    """`ringserve_kv_cache_lookups`: one definition, shared by RingserveMetrics and the KV store's
    own instruments (shared/kv/metrics.py), so both record into the same series on one meter."""
    return meter.create_counter(
        "ringserve_kv_cache_lookups",
        unit="{block}",
        description="KV cache block lookups by result (hit|miss) and node (kvstore index, Redis node host:port, "
                    "worker hot cache); hit rate = hit / (hit + miss)",
    )


def record_kv_lookup(counter, hits: int, misses: int, node: str) -> None:
    if hits:
        counter.add(hits, {"result": "hit", "node": node})
    if misses:
        counter.add(misses, {"result": "miss", "node": node})


def _code_name(code: str | enum.Enum) -> str:
    return code.value if isinstance(code, enum.Enum) else str(code)


class RingserveMetrics:
    """Every service creates one of these from its Meter and records into it."""

    def __init__(self, meter: Meter):
        self._queues: dict[str, Callable[[], int]] = {}
        self._queues_lock = threading.Lock()

        self.kv_cache_lookups = kv_cache_lookups_counter(meter)
        self.ring_comm_latency = meter.create_histogram(
            "ringserve_ring_comm_latency_milliseconds",
            unit="ms",
            description="latency of one ring communication step (K/V block transfer or partial-attention exchange)",
            explicit_bucket_boundaries_advisory=COMM_LATENCY_BUCKETS_MS,
        )
        self.attention_sparsity = meter.create_histogram(
            "ringserve_attention_sparsity_ratio",
            unit="1",
            description="fraction of attention blocks skipped (causally masked) per prefill",
            explicit_bucket_boundaries_advisory=RATIO_BUCKETS,
        )
        self.request_attention_sparsity = meter.create_histogram(
            "ringserve_attention_sparsity",
            unit="1",
            description="fraction of the causal score matrix (prefill and decode, all layers) a request's "
                        "attention pattern skipped (sliding, hybrid, strided; 0 for full attention)",
            explicit_bucket_boundaries_advisory=RATIO_BUCKETS,
        )
        self.queue_time = meter.create_histogram(
            "ringserve_queue_time_milliseconds",
            unit="ms",
            description="time a request waited in the scheduler's queue for workers with room (queued ones only)",
            explicit_bucket_boundaries_advisory=REQUEST_LATENCY_BUCKETS_MS,
        )
        self.ttft = meter.create_histogram(
            "ringserve_ttft_milliseconds",
            unit="ms",
            description="time to first token, request received to first token sent",
            explicit_bucket_boundaries_advisory=REQUEST_LATENCY_BUCKETS_MS,
        )
        self.time_per_output_token = meter.create_histogram(
            "ringserve_time_per_output_token_milliseconds",
            unit="ms",
            description="time between consecutive output tokens of one request",
            explicit_bucket_boundaries_advisory=TOKEN_LATENCY_BUCKETS_MS,
        )
        self.prefill_tokens = meter.create_counter(
            "ringserve_prefill_tokens", unit="{token}", description="prompt tokens prefilled"
        )
        self.prefill_seconds = meter.create_counter(
            "ringserve_prefill_seconds", unit="s", description="time spent prefilling (tokens/s = rate(tokens) / rate(seconds))"
        )
        self.prefill_throughput = meter.create_histogram(
            "ringserve_prefill_tokens_per_second",
            unit="{token}/s",
            description="prefill throughput of one request",
            explicit_bucket_boundaries_advisory=TOKENS_PER_SECOND_BUCKETS,
        )
        self.decode_tokens = meter.create_counter(
            "ringserve_decode_tokens", unit="{token}", description="output tokens decoded"
        )
        self.decode_seconds = meter.create_counter(
            "ringserve_decode_seconds", unit="s", description="time spent decoding (tokens/s = rate(tokens) / rate(seconds))"
        )
        self.decode_throughput = meter.create_histogram(
            "ringserve_decode_tokens_per_second",
            unit="{token}/s",
            description="decode throughput of one request",
            explicit_bucket_boundaries_advisory=TOKENS_PER_SECOND_BUCKETS,
        )
        self.requests = meter.create_counter(
            "ringserve_requests", unit="{request}", description="finished requests by outcome code (ok or an error code)"
        )
        self.request_recoveries = meter.create_counter(
            "ringserve_request_recoveries", unit="{request}",
            description="requests whose ring lost a worker or its fusion partition, by cause (worker, fusion) "
                        "and by how their recovery ended (completed, cancelled, failed)"
        )
        self.request_preemptions = meter.create_counter(
            "ringserve_request_preemptions", unit="{preemption}",
            description="running requests paused because a worker's KV pool was full, to be recomputed when room returns"
        )
        self.device_memory = meter.create_observable_gauge(
            "ringserve_device_memory_used_bytes",
            callbacks=[self._observe_device_memory],
            unit="By",
            description="memory in use: CUDA allocated bytes per GPU, process RSS as device=cpu",
        )
        self.queue_depth = meter.create_observable_gauge(
            "ringserve_queue_depth",
            callbacks=[self._observe_queues],
            unit="{request}",
            description="items waiting in a named queue",
        )

    # ------------------------------------------------------------------------------ recording
    def record_kv_lookup(self, hits: int, misses: int, node: str) -> None:
        """`node`: where the blocks were looked up: `index` (the kvstore), a Redis node's `host:port`
        (shared/kv/nodes.py `node_label`), or a worker's hot cache (`hot:<worker id>`)."""
        record_kv_lookup(self.kv_cache_lookups, hits, misses, node)

    def record_ring_comm(self, ms: float, op: str = "ring_step") -> None:
        """`op`: ring_step (prefill K/V block) or fusion (decode partial-attention exchange)."""
        self.ring_comm_latency.record(ms, {"op": op})

    def record_attention_sparsity(self, skipped_blocks: int, total_blocks: int) -> None:
        if total_blocks > 0:
            self.attention_sparsity.record(skipped_blocks / total_blocks)

    def record_request_attention_sparsity(self, fraction: float) -> None:
        self.request_attention_sparsity.record(fraction)

    def record_ttft(self, ms: float) -> None:
        self.ttft.record(ms)

    def record_queue_time(self, seconds: float) -> None:
        self.queue_time.record(seconds * MS_PER_S)

    def record_time_per_output_token(self, ms: float) -> None:
        self.time_per_output_token.record(ms)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_tokens.add(tokens)
        if seconds > 0:
            self.prefill_seconds.add(seconds)
            self.prefill_throughput.record(tokens / seconds)

    def record_decode(self, tokens: int, seconds: float) -> None:
        self.decode_tokens.add(tokens)
        if seconds > 0:
            self.decode_seconds.add(seconds)
            self.decode_throughput.record(tokens / seconds)

    def record_request(self, code: str | enum.Enum = OK_CODE) -> None:
        """`code`: OK_CODE or an ErrorCode (its value is the label)."""
        self.requests.add(1, {"code": _code_name(code)})

    def record_recovery(self, outcome: str | enum.Enum, cause: str | enum.Enum) -> None:
        """`outcome`: how a recovered request ended; `cause`: what its ring lost, a worker or its
        fusion partition (scheduler/recovery.py RecoveryOutcome, RecoveryCause)."""
        self.request_recoveries.add(1, {"outcome": _code_name(outcome), "cause": _code_name(cause)})

    def record_preemption(self) -> None:
        """A running request was preempted (scheduler/preemption.py): one more run of it to come."""
        self.request_preemptions.add(1)

    def watch_queue(self, name: str, depth: Callable[[], int]) -> None:
        """Report `depth()` as ringserve_queue_depth{queue=name} at every collection."""
        with self._queues_lock:
            self._queues[name] = depth

    def unwatch_queue(self, name: str) -> None:
        with self._queues_lock:
            self._queues.pop(name, None)

    # ------------------------------------------------------------------------------ callbacks
    def _observe_device_memory(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(used, {"device": device}) for device, used in device_memory_bytes().items()]

    def _observe_queues(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._queues_lock:
            queues = list(self._queues.items())
        return [Observation(depth(), {"queue": name}) for name, depth in queues]
