import json

import msgpack
import pytest

from services.scheduler.api import ApiError, check_limits, layer_patterns, parse_cancel, parse_generate
from shared.attention.pattern import KeyPattern
from shared.messages import ErrorCode, ModelInfo
from shared.settings import Settings

SETTINGS = Settings(max_request_bytes=4096, max_prompt_tokens=100, max_new_tokens_limit=50)
MODEL = ModelInfo(name="m", vocab_size=300, num_layers=2, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=128, eos_token_ids=[2], dtype="float32")


def _code(body: bytes, header=None):
    with pytest.raises(ApiError) as exc:
        parse_generate(body, header, SETTINGS)
    return exc.value.code


def test_json_and_msgpack_bodies_parse():
    req, ct = parse_generate(json.dumps({"prompt": "hi", "max_new_tokens": 3, "stop": "x"}).encode(), None, SETTINGS)
    assert ct == "application/json" and req.max_new_tokens == 3 and req.stop == ["x"]
    req, ct = parse_generate(msgpack.packb({"input_ids": [1, 2]}), "application/msgpack", SETTINGS)
    assert ct == "application/msgpack" and req.input_ids == [1, 2]


@pytest.mark.parametrize("body", [
    b"{not json", b"\xc1", b"[1,2]", b'"text"',
    json.dumps({}).encode(),
    json.dumps({"prompt": "a", "input_ids": [1]}).encode(),
    json.dumps({"prompt": 5}).encode(),
    json.dumps({"input_ids": [1, -2]}).encode(),
    json.dumps({"input_ids": []}).encode(),
    json.dumps({"prompt": "a", "max_new_tokens": -1}).encode(),
    json.dumps({"prompt": "a", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "a", "unknown_field": 1}).encode(),
    json.dumps({"prompt": "a", "request_id": "bad id with spaces"}).encode(),
])
def test_malformed_bodies_are_invalid_requests(body):
    assert _code(body) == ErrorCode.INVALID_REQUEST


def test_body_over_the_limit_is_refused():
    assert _code(json.dumps({"prompt": "a" * 5000}).encode()) == ErrorCode.INVALID_REQUEST


def test_limits_need_the_model():
    req, _ = parse_generate(b'{"input_ids": [1, 299], "max_new_tokens": 5}', None, SETTINGS)
    check_limits(req, [1, 299], MODEL, SETTINGS, "r")
    req, _ = parse_generate(b'{"input_ids": [300], "max_new_tokens": 5}', None, SETTINGS)
    with pytest.raises(ApiError) as e:
        check_limits(req, [300], MODEL, SETTINGS, "r")
    assert e.value.code == ErrorCode.INVALID_REQUEST and "vocabulary" in e.value.message
    req, _ = parse_generate(b'{"input_ids": [1], "max_new_tokens": 51}', None, SETTINGS)
    with pytest.raises(ApiError) as e:
        check_limits(req, [1], MODEL, SETTINGS, "r")
    assert e.value.code == ErrorCode.INVALID_REQUEST
    req, _ = parse_generate(b'{"input_ids": [1], "max_new_tokens": 5}', None, SETTINGS)
    with pytest.raises(ApiError) as e:
        check_limits(req, [1] * 101, MODEL, SETTINGS, "r")
    assert e.value.code == ErrorCode.TOO_LONG
    with pytest.raises(ApiError) as e:
        check_limits(req, [1] * 99 + [1] * 0, MODEL.model_copy(update={"max_position_embeddings": 100}), SETTINGS, "r")
    assert e.value.code == ErrorCode.TOO_LONG


def test_sequences_longer_than_a_sliding_window_are_accepted():
    windowed = MODEL.model_copy(update={"sliding_window": 40})
    req, _ = parse_generate(json.dumps({"input_ids": [1] * 30, "max_new_tokens": 50}).encode(), None, SETTINGS)
    check_limits(req, req.input_ids, windowed, SETTINGS, "r")  # sliding-window attention runs: no refusal


def test_a_prompt_whose_prefill_command_cannot_fit_the_bus_is_too_long():
    from services.scheduler.api import check_fits_bus

    ids = list(range(70_000, 80_000))  # 5 msgpack bytes each: ~50 KB
    check_fits_bus(ids, 1024 * 1024, SETTINGS, "r")
    with pytest.raises(ApiError) as exc:
        check_fits_bus(ids, 100 * 1024, SETTINGS, "r")
    assert exc.value.code == ErrorCode.TOO_LONG and "max_payload" in exc.value.message


@pytest.mark.parametrize("fields", [
    {"input_ids": ["1", "2"]},  # strings are not token ids
    {"input_ids": [1.0, 2.0]},
    {"input_ids": [True, 2]},
    {"prompt": "hi", "stream": "yes"},
    {"prompt": "hi", "logprobs": 1},
    {"prompt": "hi", "max_new_tokens": "8"},
    {"prompt": "hi", "seed": 1.5},
    {"prompt": 5},
])
def test_values_of_the_wrong_type_are_refused_not_coerced(fields):
    with pytest.raises(ApiError) as err:
        parse_generate(json.dumps(fields).encode(), "application/json", Settings())
    assert err.value.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("body", [
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than the JSON parser goes
    b'{"prompt": "a \\ud800 lone surrogate"}',
    b'{"prompt": "ok", "stop": ["\\udfff"]}',
])
def test_deep_nesting_and_lone_surrogates_are_invalid_requests_not_internal_errors(body):
    assert _code(body) == ErrorCode.INVALID_REQUEST


def test_a_million_wrong_token_ids_are_refused_with_one_error_quickly():
    body = json.dumps({"input_ids": ["1"] * 1_000_000}).encode()
    with pytest.raises(ApiError) as err:
        parse_generate(body, "application/json", Settings())
    assert err.value.code == ErrorCode.INVALID_REQUEST
    assert err.value.message.count("valid integer") == 1  # validation stopped at the first


def _with_attention(attention) -> bytes:
    return json.dumps({"input_ids": [1, 2, 3], "max_new_tokens": 4, "attention": attention}).encode()


@pytest.mark.parametrize("attention", [
    {"mode": "sparse", "window": 4},  # unknown mode
    {"mode": "sliding"}, {"mode": "hybrid", "window": 4}, {"mode": "strided", "window": 4},  # missing sizes
    {"mode": "sliding", "window": 0}, {"mode": "hybrid", "window": 4, "sinks": -1},  # non-positive
    {"mode": "strided", "window": 4, "stride": 0},
    {"mode": "sliding", "window": "4"}, {"mode": "sliding", "window": 4.0},  # not integers
    {"mode": "full", "window": 4}, {"mode": "sliding", "window": 4, "sinks": 2},  # sizes the mode takes not
    {"window": 4}, {"mode": "sliding", "window": 4, "extra": 1}, "sliding", [],
])
def test_malformed_attention_patterns_are_invalid_requests(attention):
    assert _code(_with_attention(attention)) == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("attention, pattern", [
    ({"mode": "full"}, None),
    ({"mode": "sliding", "window": 8}, KeyPattern(window=8)),
    ({"mode": "hybrid", "window": 8, "sinks": 4}, KeyPattern(window=8, sinks=4)),
    ({"mode": "strided", "window": 8, "stride": 16}, KeyPattern(window=8, stride=16)),
])
def test_attention_patterns_parse_to_their_masks(attention, pattern):
    req, _ = parse_generate(_with_attention(attention), None, SETTINGS)
    assert req.attention.key_pattern() == pattern
    check_limits(req, req.input_ids, MODEL, SETTINGS, "r")
    assert layer_patterns(req, MODEL) == [pattern, pattern]


def test_a_window_other_than_the_models_own_is_unsupported():
    windowed = MODEL.model_copy(update={"sliding_window": 16, "sliding_layers": [1]})
    req, _ = parse_generate(_with_attention({"mode": "hybrid", "window": 8, "sinks": 2}), None, SETTINGS)
    with pytest.raises(ApiError) as exc:
        check_limits(req, req.input_ids, windowed, SETTINGS, "r")
    assert exc.value.code == ErrorCode.UNSUPPORTED and "16" in exc.value.message
    same, _ = parse_generate(_with_attention({"mode": "hybrid", "window": 16, "sinks": 2}), None, SETTINGS)
    check_limits(same, same.input_ids, windowed, SETTINGS, "r")
    assert layer_patterns(same, windowed) == [KeyPattern(window=16, sinks=2)] * 2  # every layer
    full, _ = parse_generate(_with_attention({"mode": "full"}), None, SETTINGS)
    assert layer_patterns(full, windowed) == [None, KeyPattern(window=16)]  # the model's own


@pytest.mark.parametrize("body", [b"{", b'{"request_id": 5}', b'{}', b'[1]', b'{"request_id": "a b"}'])
def test_malformed_cancels_are_invalid_requests(body):
    with pytest.raises(ApiError) as err:
        parse_cancel(body, "application/json")
    assert err.value.code == ErrorCode.INVALID_REQUEST


def test_cancels_parse_from_json_and_msgpack():
    assert parse_cancel(b'{"request_id": "r-1"}', "application/json").request_id == "r-1"
    assert parse_cancel(msgpack.packb({"request_id": "r-2"}), "application/msgpack").request_id == "r-2"
