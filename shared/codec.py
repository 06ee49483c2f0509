"""Wire encoding: msgpack for internal messages (tensors as dtype + shape + raw bytes), and
JSON or msgpack for the public API, chosen by the request's Content-Type.

A tensor travels as msgpack ext type 1 whose payload is msgpack([dtype, shape]) followed by the
raw little-endian bytes. Decoding wraps the received buffer with torch.frombuffer: no copy.

Encoding copies a tensor's bytes once, from its CPU memory straight into the message's bytes:
msgpack packs the message with a 16-byte placeholder ext per tensor (a random per-process marker),
then one `bytes.join` assembles the packed pieces, each tensor's ext header and the tensor's own
memory (a uint8 view, not a copy). A tensor on a GPU, or not contiguous, is first made a
contiguous CPU tensor, which is one more copy. The bytes are the ones msgpack would write for an
ExtType holding the whole payload (if a packed string ever contained the marker, the message is
packed that way instead).
"""

from __future__ import annotations

import json
import os
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


# Tensor headers by (dtype, shape): a decode step sends the same few shapes over and over.
_HEADERS: dict[tuple[torch.dtype, torch.Size], bytes] = {}
_HEADERS_MAX = 4096
# The payload of the placeholder ext a tensor is packed as before its bytes are spliced in: 16
# bytes (msgpack fixext 16), random per process, so no packed value carries it by chance.
_MARKER = os.urandom(16)
_PLACEHOLDER_EXT = msgpack.ExtType(TENSOR_EXT, _MARKER)
_PLACEHOLDER_LEN = 2 + len(_MARKER)  # fixext 16: 0xd8, the type, the payload
# msgpack's fixext formats by payload length, and the type byte that follows an ext header.
_FIXEXT = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
_TENSOR_CODE = TENSOR_EXT.to_bytes(1, "big")


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _header(t: torch.Tensor) -> bytes:
    key = (t.dtype, t.shape)
    header = _HEADERS.get(key)
    if header is None:
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        header = _HEADERS[key] = msgpack.packb([_NAMES[t.dtype], list(t.shape)])
    return header


def _raw(t: torch.Tensor):
    """The tensor's bytes as a uint8 numpy view of its storage (no copy); `t` is CPU-contiguous."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _ext_head(n: int) -> bytes:
    """msgpack's ext header (format, length) for a payload of `n` bytes, then the type code."""
    if n in _FIXEXT:
        head = _FIXEXT[n]
    elif n < 0x100:
        head = b"\xc7" + n.to_bytes(1, "big")
    elif n < 0x10000:
        head = b"\xc8" + n.to_bytes(2, "big")
    else:
        head = b"\xc9" + n.to_bytes(4, "big")
    return head + _TENSOR_CODE



def _encode_tensor(t: torch.Tensor) -> msgpack.ExtType:
    """The tensor as one ExtType (payload built with one copy); `pack` uses it only as a fallback."""
    t = _cpu_contiguous(t)
    header = _header(t)
    return msgpack.ExtType(TENSOR_EXT, b"".join((header, _raw(t))) if t.numel() else header)


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
    tensors: list[torch.Tensor] = []

    def default(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            tensors.append(_cpu_contiguous(o))
            return _PLACEHOLDER_EXT
        return _default(o)

    packed = msgpack.packb(data, default=default, use_bin_type=True)
    if not tensors:
        return packed
    if packed.count(_MARKER) != len(tensors):  # a value held the marker: no splicing
        return msgpack.packb(data, default=_default, use_bin_type=True)
    # The placeholders appear in the order `default` was called: splice each tensor into its own.
    view = memoryview(packed)
    pieces: list[Any] = []
    at = 0
    for t in tensors:
        placeholder = packed.find(_MARKER, at) - 2
        header = _header(t)
        nbytes = t.numel() * t.element_size()
        pieces += (view[at:placeholder], _ext_head(len(header) + nbytes), header)
        if nbytes:
            pieces.append(_raw(t))
        at = placeholder + _PLACEHOLDER_LEN
    pieces.append(view[at:])
    return b"".join(pieces)


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
        except RecursionError:  # nested deeper than the parser goes: no API body is
            raise CodecError("malformed JSON: nested too deeply") from None
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
