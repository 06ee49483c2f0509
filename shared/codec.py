"""Wire encoding: msgpack for internal messages (tensors as dtype + shape + raw bytes), and
JSON or msgpack for the public API, chosen by the request's Content-Type.

A tensor travels as msgpack ext type 1 whose payload is msgpack([dtype, shape]) followed by the
raw little-endian bytes. Decoding wraps the received buffer with torch.frombuffer: no copy.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, TypeVar

import msgpack
import torch
from pydantic import BaseModel

TENSOR_EXT = 1
JSON = "application/json"
MSGPACK = "application/msgpack"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

M = TypeVar("M", bound=BaseModel)


class CodecError(ValueError):
    """The bytes are not a valid message."""


def _encode_tensor(t: torch.Tensor) -> msgpack.ExtType:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    header = msgpack.packb([_NAMES[t.dtype], list(t.shape)])
    # A uint8 view of the storage: memoryview without copying the tensor's bytes again.
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return msgpack.ExtType(TENSOR_EXT, header + raw)


def _decode_tensor(data: bytes) -> torch.Tensor:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype_name, shape = unpacker.unpack()
    offset = unpacker.tell()
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise CodecError(f"unknown tensor dtype {dtype_name!r}")
    numel = 1
    for s in shape:
        numel *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) - offset != numel * itemsize:
        raise CodecError("tensor payload length does not match its shape")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # A received tensor is a read-only view of the message bytes; nothing writes to it.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(memoryview(data)[offset:], dtype=dtype, count=numel)
    return flat.view(shape)


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _encode_tensor(obj)
    if isinstance(obj, BaseModel):
        return _dump(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TENSOR_EXT:
        return _decode_tensor(data)
    raise CodecError(f"unknown msgpack ext type {code}")


def _dump(model: BaseModel) -> dict[str, Any]:
    # mode="python" keeps tensors as tensors; enums become their values via use_enum_values below.
    return model.model_dump(mode="python", exclude_none=False)


def pack(obj: BaseModel | dict[str, Any]) -> bytes:
    data = _dump(obj) if isinstance(obj, BaseModel) else obj
    return msgpack.packb(data, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise CodecError(f"malformed msgpack: {exc}") from exc


def decode(data: bytes, model: type[M]) -> M:
    """Decode an internal msgpack message into its pydantic model (raises pydantic's errors)."""
    return model.model_validate(unpack(data))


def encode(model: BaseModel) -> bytes:
    return pack(model)


# ---- public API ------------------------------------------------------------------------------


def public_content_type(data: bytes, header: str | None) -> str:
    """The encoding of a public request: the Content-Type header, else JSON if it starts with '{'."""
    if header:
        h = header.split(";")[0].strip().lower()
        if h in (JSON, "json"):
            return JSON
        if h in (MSGPACK, "application/x-msgpack", "msgpack"):
            return MSGPACK
    return JSON if data.lstrip()[:1] == b"{" else MSGPACK


def load_public(data: bytes, content_type: str) -> Any:
    if content_type == JSON:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CodecError(f"malformed JSON: {exc}") from exc
    try:
        # Public msgpack carries no tensors: any ext type is an error.
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CodecError(f"malformed msgpack: {exc}") from exc


def dump_public(obj: BaseModel | dict[str, Any], content_type: str) -> bytes:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    if content_type == JSON:
        return json.dumps(data, separators=(",", ":")).encode()
    return msgpack.packb(data, use_bin_type=True)
