"""What every message model shares: the schema version, strict (public) and tolerant
(internal) bases and request ids."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
# top_k above any vocabulary; bounded so every command it travels in encodes (msgpack: 64-bit ints)
MAX_TOP_K = 2**31 - 1
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
# The id a request runs under on the workers: its own, or a resumed run's `<id>~r<n>` / `<id>~p<n>`
# (scheduler/recovery.py, preemption.py); "~" is outside RequestId, so no client id is a run id.
RunId = Annotated[str, Field(min_length=1, max_length=160, pattern=r"^[A-Za-z0-9_.:\-~]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Internal(BaseModel):
    """Internal messages: tensors allowed, unknown fields ignored (newer senders stay readable)."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)
    v: int = SCHEMA_VERSION
