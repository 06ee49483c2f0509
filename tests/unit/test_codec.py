import msgpack
import pytest
import torch
from pydantic import BaseModel

from shared import codec
from shared.messages import (
    ErrorCode,
    FusionReply,
    FusionRequest,
    GenerateReply,
    MergedItem,
    PartialItem,
    Timings,
    Usage,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_tensor_round_trip_keeps_dtype_shape_and_bytes(dtype):
    t = (torch.randn(3, 5, 7) * 10).to(dtype)
    item = PartialItem(request_id="r", step=1, layer=2, member=0, parts=2, out=t, lse=torch.randn(3, 5))
    back = codec.decode(codec.encode(item), PartialItem)
    assert back.out.dtype == dtype and back.out.shape == t.shape
    assert torch.equal(back.out, t)
    assert torch.equal(back.lse, item.lse)


def test_empty_and_noncontiguous_tensors():
    t = torch.randn(4, 6).t()  # non-contiguous
    reply = FusionReply(items=[MergedItem(request_id="r", step=0, layer=0, out=t, lse=torch.empty(0, 3))])
    back = codec.decode(codec.encode(reply), FusionReply)
    assert torch.equal(back.items[0].out, t)
    assert back.items[0].lse.shape == (0, 3)


def test_truncated_tensor_payload_is_rejected():
    data = codec.encode(MergedItem(request_id="r", step=0, layer=0, out=torch.randn(2, 2, 2), lse=torch.randn(2, 2)))
    with pytest.raises(codec.CodecError):
        codec.unpack(data[:-3])
    with pytest.raises(codec.CodecError):
        codec.unpack(b"\xc1\xff garbage")


def test_public_encoding_is_chosen_by_header_then_first_byte():
    assert codec.public_content_type(b'{"a":1}', None) == codec.JSON
    assert codec.public_content_type(b"\x81\xa1a\x01", None) == codec.MSGPACK
    assert codec.public_content_type(b"\x81\xa1a\x01", "application/msgpack") == codec.MSGPACK
    assert codec.public_content_type(b'{"a":1}', "application/json; charset=utf-8") == codec.JSON
    reply = GenerateReply(request_id="x", output_ids=[1, 2], text=None, finish_reason="length",
                          usage=Usage(prompt_tokens=1, completion_tokens=2),
                          timings=Timings(queue_ms=0, ttft_ms=1, total_ms=2))
    for ct in (codec.JSON, codec.MSGPACK):
        body = codec.load_public(codec.dump_public(reply, ct), ct)
        assert body["output_ids"] == [1, 2] and body["finish_reason"] == "length"
    err = codec.load_public(codec.dump_public({"error": {"code": ErrorCode.TOO_LONG.value}}, codec.JSON), codec.JSON)
    assert err["error"]["code"] == "too_long"
    with pytest.raises(codec.CodecError):
        codec.load_public(b"{not json", codec.JSON)


# ---- the wire format of tensors is the one the previous encoder wrote, byte for byte ------------

_OLD_NAMES = {v: k for k, v in codec._DTYPES.items()}


def _old_encode_tensor(t: torch.Tensor) -> msgpack.ExtType:
    """The encoder as it was (header + raw copied into one ExtType payload), kept as the reference."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    header = msgpack.packb([_OLD_NAMES[t.dtype], list(t.shape)])
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return msgpack.ExtType(codec.TENSOR_EXT, header + raw)


def _old_pack(obj) -> bytes:
    def default(o):
        if isinstance(o, torch.Tensor):
            return _old_encode_tensor(o)
        if isinstance(o, BaseModel):
            return codec._dump(o)
        raise TypeError(type(o).__name__)

    data = codec._dump(obj) if isinstance(obj, BaseModel) else obj
    return msgpack.packb(data, default=default, use_bin_type=True)


def test_golden_tensor_bytes():
    # ext 8 (0xc7), 11 bytes, type 1: msgpack(["uint8", [2]]) then the two raw bytes
    assert codec.pack({"t": torch.tensor([1, 2], dtype=torch.uint8)}) == (
        b"\x81\xa1t\xc7\x0b\x01\x92\xa5uint8\x91\x02\x01\x02")


def test_every_ext_length_format_matches_the_old_encoder():
    # payload = 9 to 11 header bytes + n: fixext 16, ext 8, ext 16, ext 32 and their edges
    for n in [*range(0, 300), *range(65_515, 65_535), 70_000]:
        t = torch.arange(n, dtype=torch.int64).to(torch.uint8)
        msg = {"a": t, "n": n}
        assert codec.pack(msg) == _old_pack(msg), n
        assert torch.equal(codec.unpack(codec.pack(msg))["a"], t)


@pytest.mark.parametrize("dtype", list(codec._DTYPES.values()))
def test_messages_with_tensors_match_the_old_encoder(dtype):
    g = torch.Generator().manual_seed(0)
    out = (torch.randn(3, 8, 16, generator=g) * 50).to(dtype)
    items = [PartialItem(request_id=f"r{i}", step=i, layer=2, member=0, parts=2, out=out[i], lse=torch.randn(8))
             for i in range(3)]
    request = FusionRequest(worker_id="w-1", items=items)
    assert codec.encode(request) == _old_pack(request)
    for scalar in (torch.tensor(True), torch.tensor(7, dtype=torch.int8), torch.tensor(1.5)):  # fixext 8 and 16
        assert codec.pack({"s": scalar.to(dtype)}) == _old_pack({"s": scalar.to(dtype)})


def test_awkward_tensors_match_the_old_encoder():
    big = torch.randn(256 * 1024)  # 1 MB
    grad = torch.randn(4, 4, requires_grad=True)
    msg = {"big": big, "t": torch.randn(6, 4).t(), "empty": torch.empty(0, 3), "grad": grad, "slice": big[10:20],
           "nested": [{"x": torch.ones(2, dtype=torch.bfloat16)}, None, "s"]}
    assert codec.pack(msg) == _old_pack(msg)
    back = codec.unpack(codec.pack(msg))
    assert torch.equal(back["big"], big) and torch.equal(back["t"], msg["t"]) and back["empty"].shape == (0, 3)


def test_a_value_holding_the_marker_falls_back_to_the_same_bytes():
    msg = {"bin": b"x" + codec._MARKER + b"y", "t": torch.randn(5), "u": torch.arange(3)}
    assert codec.pack(msg) == _old_pack(msg)
    back = codec.unpack(codec.pack(msg))
    assert back["bin"] == msg["bin"] and torch.equal(back["t"], msg["t"])
