import pytest
import torch

from shared import codec
from shared.messages import ErrorCode, FusionReply, GenerateReply, MergedItem, PartialItem, Timings, Usage


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
