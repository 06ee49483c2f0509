"""The gateway's pure parts: OpenAI bodies -> GenerateRequest, replies -> OpenAI bodies, errors."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from pydantic import ValidationError

from services.gateway.errors import GatewayError
from services.gateway.openai_models import ChatCompletionRequest, CompletionRequest
from services.gateway.translate import (
    chat_response,
    chat_to_generate,
    completion_response,
    completion_to_generate,
)
from shared.messages import ErrorCode, GenerateReply

RID = "gw-1"


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "demo", "prompt": "Hi", **fields})


def reply(**fields) -> GenerateReply:
    return GenerateReply.model_validate({
        "request_id": RID, "output_ids": [72, 105], "text": "Hi", "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 1},
        "timings": {"queue_ms": 0, "ttft_ms": 1, "total_ms": 2}, **fields})


class FakeTemplate:
    def render(self, messages, add_generation_prompt=True):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + ("|assistant:" if add_generation_prompt else "")


class FakeTokenizer:
    def encode_rendered(self, text):
        return [ord(c) for c in text]

    def token_text(self, token_id):
        return chr(token_id)


# ---- completions ------------------------------------------------------------------------------
def test_completion_fields_map_onto_the_nats_request():
    req = completion_to_generate(completion(max_tokens=5, temperature=0, top_p=0.5, seed=3, stop="\n",
                                            stream=True, top_k=4, kv_quant="int8"), RID)
    assert req.prompt == "Hi" and req.input_ids is None
    assert (req.max_new_tokens, req.temperature, req.top_p, req.seed, req.top_k) == (5, 0.0, 0.5, 3, 4)
    assert req.stop == ["\n"] and req.stream and req.request_id == RID and req.kv_quant.value == "int8"
    assert not req.logprobs


def test_completion_defaults_are_openais():
    req = completion_to_generate(completion(), RID)
    assert req.max_new_tokens == 16 and req.temperature == 1.0 and req.stop == []


@pytest.mark.parametrize("prompt, expected", [
    ("text", {"prompt": "text"}),
    ([1, 2, 3], {"input_ids": [1, 2, 3]}),
    (["text"], {"prompt": "text"}),
    ([[4, 5]], {"input_ids": [4, 5]}),
])
def test_prompt_forms(prompt, expected):
    req = completion_to_generate(completion(prompt=prompt), RID)
    assert req.model_dump(include={"prompt", "input_ids"}, exclude_none=True) == expected


@pytest.mark.parametrize("prompt, code", [(["a", "b"], "unsupported"), ([[1], [2]], "unsupported"),
                                         ("", "invalid_request"), ([], "invalid_request")])
def test_batched_or_empty_prompts_are_refused(prompt, code):
    with pytest.raises(GatewayError) as info:
        completion_to_generate(completion(prompt=prompt), RID)
    assert info.value.code == code and info.value.status == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
    ({"logprobs": 2}, "logprobs"), ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
])
def test_what_ringserve_cannot_honour_is_unsupported(fields, param):
    with pytest.raises(GatewayError) as info:
        completion_to_generate(completion(**fields), RID)
    assert (info.value.code, info.value.param, info.value.status) == ("unsupported", param, HTTPStatus.BAD_REQUEST)


def test_neutral_values_of_unsupported_fields_are_accepted():
    req = completion_to_generate(completion(n=1, best_of=1, echo=False, presence_penalty=0, logprobs=0,
                                            user="u", logit_bias={}), RID)
    assert req.logprobs  # logprobs=0: the sampled token's logprob only


def test_unknown_fields_are_refused_but_ours_pass():
    with pytest.raises(ValidationError) as info:
        completion(no_such_field=1)
    error = GatewayError.from_validation(info.value)
    assert error.param == "no_such_field" and error.code == "invalid_request"
    with pytest.raises(ValidationError):
        completion(kv_quant="int3")
    with pytest.raises(ValidationError):
        completion(temperature=2.5)  # OpenAI's bound


def test_an_attention_pattern_passes_through_and_a_malformed_one_is_invalid():
    req = completion_to_generate(completion(attention={"mode": "hybrid", "window": 64, "sinks": 4}), RID)
    assert req.attention is not None and req.attention.key_pattern().sinks == 4
    for bad in ({"mode": "sparse"}, {"mode": "sliding"}, {"mode": "sliding", "window": 0}, "sliding"):
        with pytest.raises(ValidationError) as info:
            completion(attention=bad)
        error = GatewayError.from_validation(info.value)
        assert error.code == "invalid_request" and error.param.startswith("attention")


def test_nats_request_limits_become_invalid_request_with_the_field():
    with pytest.raises(GatewayError) as info:
        completion_to_generate(completion(stop=["", "x"]), RID)
    assert info.value.code == "invalid_request" and info.value.param.startswith("stop")


# ---- chat -------------------------------------------------------------------------------------
def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "demo", "messages": [{"role": "system", "content": "S"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}], **fields})


def test_chat_renders_the_template_and_sends_token_ids():
    req = chat_to_generate(chat(max_completion_tokens=7, logprobs=True), RID, FakeTemplate(), FakeTokenizer(), 99)
    assert req.prompt is None and req.input_ids == [ord(c) for c in "system:S|user:ab|assistant:"]
    assert req.max_new_tokens == 7 and req.logprobs
    assert chat_to_generate(chat(), RID, FakeTemplate(), FakeTokenizer(), 99).max_new_tokens == 99


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tools"), ({"n": 3}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "r", "tool_call_id": "c"}]}, "messages.0"),
])
def test_chat_tools_images_and_n_are_unsupported(fields, param):
    with pytest.raises(GatewayError) as info:
        chat_to_generate(chat(**fields), RID, FakeTemplate(), FakeTokenizer(), 99)
    assert (info.value.code, info.value.param) == ("unsupported", param)


def test_chat_without_a_template_is_unsupported():
    with pytest.raises(GatewayError) as info:
        chat_to_generate(chat(), RID, None, None, 99)
    assert info.value.code == "unsupported"


# ---- replies ----------------------------------------------------------------------------------
def test_completion_response_shape():
    body = completion_response(reply(), "demo", 123).model_dump()
    assert body["id"] == "cmpl-gw-1" and body["object"] == "text_completion" and body["created"] == 123
    assert body["choices"] == [{"index": 0, "text": "Hi", "finish_reason": "length", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_chat_response_shape_with_logprobs():
    body = chat_response(reply(logprobs=[-0.5, -1.0]), "demo", 1, FakeTokenizer()).model_dump()
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-gw-1"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi"}
    assert [(t["token"], t["logprob"], t["bytes"]) for t in choice["logprobs"]["content"]] == [
        ("H", -0.5, [72]), ("i", -1.0, [105])]


def test_completion_logprobs_offsets():
    logprobs = completion_response(reply(logprobs=[-0.5, -1.0]), "demo", 1, FakeTokenizer()).choices[0].logprobs
    assert logprobs.tokens == ["H", "i"] and logprobs.text_offset == [0, 1] and logprobs.token_logprobs == [-0.5, -1.0]


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("code, status, openai_code, type_", [
    (ErrorCode.INVALID_REQUEST, 400, "invalid_request", "invalid_request_error"),
    (ErrorCode.TOO_LONG, 400, "context_length_exceeded", "invalid_request_error"),
    (ErrorCode.UNSUPPORTED, 400, "unsupported", "invalid_request_error"),
    (ErrorCode.OVERLOADED, 429, "overloaded", "rate_limit_error"),
    (ErrorCode.UNAVAILABLE, 503, "unavailable", "service_unavailable_error"),
    (ErrorCode.TIMEOUT, 504, "timeout", "timeout_error"),
    (ErrorCode.INTERNAL, 500, "internal", "server_error"),
])
def test_ringserve_errors_map_to_http_statuses_in_openais_shape(code, status, openai_code, type_):
    error = GatewayError.from_ringserve(code.value, "why")
    assert error.status == status
    assert error.body() == {"error": {"message": "why", "type": type_, "param": None, "code": openai_code}}


def test_every_ringserve_error_code_has_a_status():
    from services.gateway.errors import STATUS_BY_CODE

    assert set(STATUS_BY_CODE) == {c.value for c in ErrorCode}
