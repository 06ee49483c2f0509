"""The stored block format: exact round trips, and every kind of damage detected."""

from __future__ import annotations

import struct

import pytest
import torch

from shared.kv.block import HEADER_BYTES, CorruptBlock, decode_block, encode_block
from shared.kv.quant import QUANT_MODES, dequantize_kv, quantize_kv


def _block(mode: str, dtype=torch.bfloat16) -> bytes:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(37, 3, 40, generator=g).to(dtype), torch.randn(37, 3, 40, generator=g).to(dtype)
    return encode_block(quantize_kv(k, v, mode, 16))


@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(mode, dtype):
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(37, 3, 40, generator=g).to(dtype), torch.randn(37, 3, 40, generator=g).to(dtype)
    q = quantize_kv(k, v, mode, 16)
    data = encode_block(q)
    back = decode_block(data)
    assert (back.mode, back.dtype, back.shape, back.group) == (q.mode, q.dtype, q.shape, q.group)
    assert len(data) == HEADER_BYTES + q.nbytes
    for a, b in zip(dequantize_kv(q), dequantize_kv(back)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_truncated_or_extended_is_corrupt(mode):
    data = _block(mode)
    for bad in (b"", data[:HEADER_BYTES - 1], data[:HEADER_BYTES], data[:-1], data + b"\0"):
        with pytest.raises(CorruptBlock):
            decode_block(bad)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_any_flipped_byte_is_corrupt(mode):
    data = _block(mode)
    # Every header byte, and payload bytes at the start, middle and end.
    positions = list(range(HEADER_BYTES)) + [HEADER_BYTES, len(data) // 2, len(data) - 1]
    for at in positions:
        bad = bytearray(data)
        bad[at] ^= 0x10
        with pytest.raises(CorruptBlock):
            decode_block(bytes(bad))


def test_other_format_version_is_refused():
    data = bytearray(_block("int8"))
    data[4] = 99  # version byte, right after the magic; the checksum covers it too
    with pytest.raises(CorruptBlock):
        decode_block(bytes(data))


def test_garbage_is_corrupt():
    with pytest.raises(CorruptBlock):
        decode_block(struct.pack("<4s", b"RSKV") + b"\xff" * 200)
