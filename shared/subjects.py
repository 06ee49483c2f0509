"""Every NATS subject ringserve uses, in one place (docs/ARCHITECTURE.md mirrors this file)."""

from __future__ import annotations

# --- public API (any NATS client) --------------------------------------------------------------
GENERATE = "ringserve.v1.generate"
CANCEL = "ringserve.v1.cancel"
STATUS = "ringserve.v1.status"

# --- internal control plane --------------------------------------------------------------------
_INTERNAL = "ringserve.internal.v1"
HEARTBEAT = f"{_INTERNAL}.heartbeat"  # .<service>.<instance>
WORLD_FORM = f"{_INTERNAL}.world.form"  # broadcast to all workers


def heartbeat(service: str, instance: str) -> str:
    return f"{HEARTBEAT}.{service}.{instance}"


def heartbeats(service: str) -> str:
    """Every instance's heartbeats of one service."""
    return f"{HEARTBEAT}.{service}.>"


def worker_inbox(worker_id: str, verb: str) -> str:
    """Commands addressed to one worker: prefill, decode, release, abort (a prefill cancelled)."""
    return f"{_INTERNAL}.worker.{worker_id}.{verb}"


def fusion_partials(partition: str) -> str:
    """Partials of the requests placed on one fusion instance (all parts of a merge meet there)."""
    return f"{_INTERNAL}.fusion.{partition}.partials"


def fusion_drop(partition: str) -> str:
    """Scheduler -> fusion: a request failed or ended early; answer its pending merges with an error."""
    return f"{_INTERNAL}.fusion.{partition}.drop"


# --- kv store metadata (bulk bytes go to Redis directly, never over the bus) -------------------
KV_LOOKUP = f"{_INTERNAL}.kv.lookup"
KV_COMMIT = f"{_INTERNAL}.kv.commit"
KV_TOUCH = f"{_INTERNAL}.kv.touch"
KV_PIN = f"{_INTERNAL}.kv.pin"
KV_SHARD = f"{_INTERNAL}.kv.shard"  # room for decode shards in the KV budget
KV_STATS = f"{_INTERNAL}.kv.stats"

SERVICE_QUEUE = "ringserve"
WORLD_READY = f"{_INTERNAL}.world.ready"  # workers -> scheduler


def tokens(scheduler_instance: str) -> str:
    """Ring leaders -> the scheduler instance that owns their requests: each decode step's tokens."""
    return f"{_INTERNAL}.tokens.{scheduler_instance}"


def progress(request_id: str) -> str:
    """Prefill progress of one request, published by its ring leader for the scheduler."""
    return f"{_INTERNAL}.progress.{request_id}"
