"""One settings object for every service, read once from `RINGSERVE_*` variables and passed down.

Nothing below `main` reads the environment; tests build `Settings(...)` directly.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RINGSERVE_", extra="ignore")

    # --- connections -------------------------------------------------------------------------
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None
    # TLS to NATS (a tls:// URL, or any URL once a CA is set): the CA that signed the server's
    # certificate, and a client certificate and key where the server asks for one.
    nats_tls_ca_file: str | None = None
    nats_tls_cert_file: str | None = None
    nats_tls_key_file: str | None = None
    # Comma-separated list: several Redis nodes are used by consistent hashing of block keys.
    # TLS: rediss://host:port/0?ssl_ca_certs=/ca.pem (and ssl_certfile, ssl_keyfile): redis-py's URL form.
    redis_url: str = "redis://127.0.0.1:6379/0"

    # --- model -------------------------------------------------------------------------------
    # A Hugging Face checkpoint directory (config.json + *.safetensors), or "demo".
    model: str = "demo"
    # Where `demo` is materialised as a real checkpoint directory.
    demo_dir: str = ".ringserve/demo-model"
    device: Literal["cpu", "cuda"] = "cpu"
    # None: float32 on CPU, bfloat16 on CUDA.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    # --- request limits ----------------------------------------------------------------------
    max_prompt_tokens: int = Field(default=1_048_576, ge=1)
    max_new_tokens_limit: int = Field(default=4096, ge=1)
    # The largest public request body accepted (bytes); larger bodies get `invalid_request`.
    # The NATS server's own max_payload (infra/nats) must be at least this.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=256)
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Requests waiting for workers beyond this count are refused with `overloaded`.
    max_queued_requests: int = Field(default=256, ge=1)
    # Requests waiting for workers with room go shortest remaining prefill first; each second
    # waited counts as this many tokens less prefill, so a long prompt is never starved: a 128K
    # prompt goes ahead of fresh 8K ones after ~30 s of waiting.
    admission_aging_tokens_per_s: float = Field(default=4096.0, gt=0)
    # Requests running at once (prefill or decode) on one scheduler; more are refused with
    # `overloaded`, which a client retries later or elsewhere, rather than slowing everyone.
    max_active_requests: int = Field(default=256, ge=1)
    max_recoveries: int = Field(default=1, ge=0)  # re-runs of a request whose ring lost a worker (scheduler/recovery.py)
    # Re-runs of a request preempted because its worker's KV pool was full (scheduler/preemption.py);
    # counted apart from max_recoveries. Past it the request fails `overloaded`.
    max_preemptions: int = Field(default=8, ge=0)
    # KV tokens admission reserves for a request's decode, on top of its prompt: None, all of
    # max_new_tokens (no decode can overfill a worker this scheduler placed on); a number admits more
    # requests at once (most end before max_new_tokens) and relies on preemption when a pool fills.
    admission_decode_reserve_tokens: int | None = Field(default=None, ge=0)

    # --- placement ---------------------------------------------------------------------------
    # Overrides the chunk-size policy (8K/16K/32K by context length) when set.
    chunk_tokens: int | None = Field(default=None, ge=1)
    chunk_small_tokens: int = 8192
    chunk_medium_tokens: int = 16384
    chunk_large_tokens: int = 32768
    chunk_small_below: int = 100_000
    chunk_large_above: int = 500_000
    # Upper bound on the ring size of one request (0: all workers).
    max_ring_size: int = Field(default=0, ge=0)
    # KV tokens one worker may hold; placement uses more ring members, or waits, rather than
    # overfill one. 0: on CUDA, what kv_memory_fraction of the GPU memory free after loading the
    # model holds; on CPU, no limit.
    worker_max_tokens: int = Field(default=0, ge=0)
    kv_memory_fraction: float = Field(default=0.8, gt=0, le=1)

    # --- decode ------------------------------------------------------------------------------
    # Requests one decode step of a worker holds; more take turns. Also the largest CUDA graph.
    decode_max_batch: int = Field(default=64, ge=1)
    # Capture the decode step in CUDA graphs (one per batch-size bucket) on CUDA workers.
    decode_cuda_graphs: bool = True
    # The worker's interpreter hands the GIL to a waiting thread after this long (Python's default
    # is 5 ms): each torch call lets the GIL go, and the compute thread must not wait that long to
    # get it back from a KV I/O thread every time (measured on an H200: decode 3.5x slower at 0.5 ms).
    worker_switch_interval_s: float = Field(default=0.0001, gt=0)
    # Prefill runs each layer's MLP over at most this many tokens at once: the activations of a
    # long prompt stay small beside the KV pool, which takes kv_memory_fraction of the GPU.
    prefill_mlp_chunk_tokens: int = Field(default=8192, ge=1)
    # A prompt one worker holds alone is prefilled this many positions at a time, the decode
    # steps of its other requests running between two chunks (a ring prefills in one pass).
    prefill_step_tokens: int = Field(default=8192, ge=1)
    # The KV pool of a worker without a capacity (CPU) starts this large, in tokens, and grows.
    kv_pool_initial_tokens: int = Field(default=16384, ge=1)

    # --- distributed -------------------------------------------------------------------------
    fusion: Literal["bus", "collective"] = "bus"
    fusion_timeout_s: float = Field(default=30.0, gt=0)
    # Timeout of torch.distributed operations: a dead peer turns into an error, not a hang.
    dist_timeout_s: float = Field(default=60.0, gt=0)
    # Host other workers use to reach this worker's rendezvous store.
    advertise_host: str = "127.0.0.1"

    # --- liveness ----------------------------------------------------------------------------
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    # A worker silent for this long is considered gone.
    heartbeat_timeout_s: float = Field(default=4.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, gt=0)

    # --- kv store ----------------------------------------------------------------------------
    kv_block_tokens: int = Field(default=256, ge=1)
    kv_quant: Literal["none", "int8", "int4"] = "none"
    kv_group_size: int = Field(default=32, ge=1)
    # Redis bytes of prefix blocks and decode shards together (the kvstore evicts blocks for room).
    # None (the default): the kvstore derives it from its Redis nodes at start and on each sweep
    # (services/kvstore/derived_budget.py): kv_budget_fraction of a node's maxmemory, or, where
    # maxmemory is 0 (unlimited), kv_budget_host_fraction of the memory of the node's host. The
    # rest is left to the block metadata, Redis's own overhead and, on a shared host, the others.
    # A value set here wins.
    kv_budget_bytes: int | None = Field(default=None, ge=0)
    kv_budget_fraction: float = Field(default=0.8, gt=0, le=1)
    kv_budget_host_fraction: float = Field(default=0.5, gt=0, le=1)
    # A block lives this long in Redis after its last use (write, lookup hit, pin, touch).
    kv_ttl_s: int = Field(default=3600, ge=1)
    kv_store_enabled: bool = True
    # The device tier of the prefix cache: a one-worker request's full prompt blocks stay in the
    # worker's KV pool after it ends (until the pool needs the pages), and a later prompt with
    # that prefix maps them instead of loading them from Redis.
    kv_resident_prefix: bool = True
    # The host tier below it: blocks the pool lets go of are copied to the worker's host memory
    # (pinned on CUDA: copied back by DMA at PCIe speed), up to this many bytes, least recently
    # used dropped first; a later prompt copies them back instead of loading them from Redis.
    # Taken in pieces as blocks arrive, not at start. 4 GiB holds a 32K-token prefix of an 8B
    # bf16 model (128 KiB a token) and pins at most 32 GiB on a host of 8 GPU workers; raise it
    # where host memory is to spare. On a CPU device it is memory beside the pool's. 0: off.
    kv_host_cache_bytes: int = Field(default=4 * 1024**3, ge=0)
    # The cost model (services/worker/prefix_costs.py): cached K/V are loaded from Redis only
    # when the worker's measured load rate beats its measured prefill rate for those tokens.
    # Each new measurement weighs this much in the running rates; a load predicted slower is
    # still tried every kv_cost_probe_every-th time, so a faster store is noticed. Off: always load.
    kv_cost_model: bool = True
    kv_cost_rate_weight: float = Field(default=0.3, gt=0.0, le=1.0)
    kv_cost_probe_every: int = Field(default=16, ge=1)
    # Prompt blocks whose worker the scheduler remembers, to place a later prompt with that
    # prefix there (cache-aware placement), least recently recorded forgotten first.
    placement_block_homes: int = Field(default=1_000_000, ge=0)
    kv_hot_cache_bytes: int = Field(default=256 * 1024**2, ge=0)
    kv_io_concurrency: int = Field(default=8, ge=1)
    # Threads of a worker that copy KV rows to the host and encode or decode blocks.
    kv_io_threads: int = Field(default=2, ge=1)
    # A copy of KV rows to the host goes in pieces of at most this many bytes, one at a time: the
    # decode step's own small copies (its inputs, its tokens) wait behind at most one piece.
    kv_io_copy_chunk_bytes: int = Field(default=4 * 1024**2, ge=1)
    # Every N-th decode step, workers add the attention mass each stored block received to its
    # importance (H2O), reported to the kvstore on release; 0 turns it off.
    kv_importance_every: int = Field(default=16, ge=0)
    # Eviction priority = last access time + this many seconds per unit of attention mass (H2O).
    kv_importance_weight_s: float = Field(default=600.0, ge=0)
    # A Redis call slower than this counts as an outage; an unreachable node is retried this often.
    kv_redis_timeout_s: float = Field(default=2.0, gt=0)
    kv_redis_retry_s: float = Field(default=1.0, gt=0)
    # Timeout of a worker's/scheduler's metadata request to the kvstore service.
    kv_index_timeout_s: float = Field(default=2.0, gt=0)
    # How often the kvstore service drops blocks past their TTL and re-checks the budget.
    kv_sweep_interval_s: float = Field(default=10.0, gt=0)
    # Prefix caching: the most blocks one ring member stores after one prefill (the leading ones).
    kv_store_max_blocks: int = Field(default=4096, ge=0)
    # Decode KV shards copied to Redis as they grow (another worker can load them; needs
    # kv_store_enabled and a kvstore, which grants them room in kv_budget_bytes); their keys
    # expire after this long, so keep it above request_timeout_s.
    kv_shard_persist: bool = True
    kv_shard_ttl_s: int = Field(default=3600, ge=1)

    # --- HTTP gateway (OpenAI-compatible API) ---------------------------------------------------
    # Where the gateway listens; 0.0.0.0 in containers, loopback for `ringserve up`.
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    # Comma-separated API keys; when set, every /v1 request needs `Authorization: Bearer <key>`.
    api_keys: str | None = None

    # --- observability -----------------------------------------------------------------------
    log_level: str = "info"
    # Decode steps traced in the fusion service (and as worker decode spans): step 0 and every
    # N-th; a span per layer per token would cost more than the merge it describes.
    trace_decode_every: int = Field(default=16, ge=1)
    # Port of the Prometheus scrape endpoint (0: none). One port per process: give each service
    # process on a host its own (containers and pods each have their own network).
    metrics_port: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.chunk_small_below > self.chunk_large_above:
            raise ValueError("chunk_small_below must not exceed chunk_large_above")
        return self

    @cached_property
    def torch_dtype_name(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def redis_urls(self) -> list[str]:
        return [u.strip() for u in self.redis_url.split(",") if u.strip()]
