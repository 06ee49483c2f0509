"""The bytes of one stored KV block (one layer): a fixed header, then the QuantizedKV's tensors.

    header  magic "RSKV" | format version | quant mode | dtype | tokens | kv_heads | head_dim |
            group | payload length | crc32 of (header before the crc + payload)
    payload the tensors of `kv_layout(...)`, in order, raw little-endian bytes

Anything that does not decode to exactly the expected layout and checksum raises `CorruptBlock`;
the store deletes such a block and reports a miss, so it never reaches the model.
"""

from __future__ import annotations

import math
import struct
import zlib

import torch

from shared.kv.quant import QuantizedKV, kv_layout

MAGIC = b"RSKV"
FORMAT_VERSION = 1
# magic, version, mode, dtype, reserved, tokens, kv_heads, head_dim, group, payload bytes, crc32
_HEADER = struct.Struct("<4sBBBBIIIIQI")
HEADER_BYTES = _HEADER.size
_CRC_BYTES = 4

_MODES = ("none", "int8", "int4")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CorruptBlock(ValueError):
    """The bytes are not a whole, intact block of this format."""


def encode_block(q: QuantizedKV) -> bytearray:
    if q.mode not in _MODES or q.dtype not in _DTYPES:
        raise ValueError(f"cannot store mode {q.mode!r} with dtype {q.dtype}")
    layout = kv_layout(q.mode, q.dtype, q.shape, q.group)
    sections = [q.parts[name].contiguous().view(-1).view(torch.uint8) for name, _, _ in layout]
    payload_len = sum(s.numel() for s in sections)
    # One buffer, written in place: a block is copied once on its way to Redis.
    out = bytearray(HEADER_BYTES + payload_len)
    if payload_len:
        payload = torch.frombuffer(out, dtype=torch.uint8)[HEADER_BYTES:]
        offset = 0
        for section in sections:
            payload[offset : offset + section.numel()].copy_(section)
            offset += section.numel()
    _HEADER.pack_into(
        out, 0, MAGIC, FORMAT_VERSION, _MODES.index(q.mode), _DTYPES.index(q.dtype), 0, *q.shape, q.group,
        payload_len, 0,
    )
    view = memoryview(out)
    crc = zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[: HEADER_BYTES - _CRC_BYTES]))
    struct.pack_into("<I", out, HEADER_BYTES - _CRC_BYTES, crc)
    return out


def decode_block(data: bytes | bytearray | memoryview) -> QuantizedKV:
    """Bytes from Redis -> QuantizedKV; raises CorruptBlock."""
    if len(data) < HEADER_BYTES:
        raise CorruptBlock(f"{len(data)} bytes is shorter than the header")
    magic, version, mode_i, dtype_i, _, tokens, heads, dim, group, payload_len, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"format version {version}, expected {FORMAT_VERSION}")
    if mode_i >= len(_MODES) or dtype_i >= len(_DTYPES) or group < 1:
        raise CorruptBlock("bad quant mode, dtype or group in header")
    if len(data) != HEADER_BYTES + payload_len:
        raise CorruptBlock(f"{len(data)} bytes, header says {HEADER_BYTES + payload_len}")
    view = memoryview(data)
    if zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[: HEADER_BYTES - _CRC_BYTES])) != crc:
        raise CorruptBlock("checksum mismatch")

    mode, dtype, shape = _MODES[mode_i], _DTYPES[dtype_i], (tokens, heads, dim)
    layout = kv_layout(mode, dtype, shape, group)
    sizes = [math.prod(s) * dt.itemsize for _, s, dt in layout]
    if sum(sizes) != payload_len:
        raise CorruptBlock("payload length does not match the shape in the header")
    # One copy into a buffer we own: Redis hands out immutable bytes, torch wants writable memory.
    payload = bytearray(view[HEADER_BYTES:])
    raw = torch.frombuffer(payload, dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    parts, offset = {}, 0
    for (name, part_shape, part_dtype), size in zip(layout, sizes):
        section = raw[offset : offset + size]
        if offset % part_dtype.itemsize:
            section = section.clone()  # a misaligned section: reinterpreting it needs aligned memory
        parts[name] = section.view(part_dtype).view(part_shape)
        offset += size
    return QuantizedKV(mode, dtype, shape, group, parts)
