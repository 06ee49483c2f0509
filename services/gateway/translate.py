"""OpenAI request bodies -> the NATS API's GenerateRequest, and GenerateReply -> OpenAI response
bodies. Pure functions: no I/O, tested on their own (tests/unit/test_gateway_translate.py)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from services.gateway.chat_template import ChatTemplate, ChatTemplateError
from services.gateway.errors import GatewayError
from services.gateway.openai_models import (
    DEFAULT_TEMPERATURE,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ImagePart,
    UsageBody,
    _Sampling,
)
from services.gateway.prompt_tokens import PromptTokenizer
from shared.messages import GenerateReply, GenerateRequest, Usage

COMPLETION_ID_PREFIX = "cmpl-"
CHAT_ID_PREFIX = "chatcmpl-"
TEXT_RESPONSE_FORMAT = "text"


# ---- what is refused before anything is sent ---------------------------------------------------


def _refuse_unsupported(req: _Sampling) -> None:
    """Fields OpenAI defines that ringserve cannot honour yet: a clear 400 `unsupported`, never
    a silent answer to a different question."""
    if req.n is not None and req.n > 1:
        raise GatewayError.unsupported("n > 1 is not supported: send one request per completion", "n")
    if req.logit_bias:
        raise GatewayError.unsupported("logit_bias is not supported", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise GatewayError.unsupported(f"{name} is not supported (only 0)", name)


def _refuse_unsupported_completion(req: CompletionRequest) -> None:
    _refuse_unsupported(req)
    if req.best_of is not None and req.best_of > 1:
        raise GatewayError.unsupported("best_of > 1 is not supported", "best_of")
    if req.echo:
        raise GatewayError.unsupported("echo is not supported", "echo")
    if req.suffix:
        raise GatewayError.unsupported("suffix is not supported", "suffix")
    if req.logprobs:
        raise GatewayError.unsupported("only the sampled token's logprob is available: logprobs must be 0",
                                       "logprobs")


def _refuse_unsupported_chat(req: ChatCompletionRequest) -> None:
    _refuse_unsupported(req)
    if req.tools or req.functions or req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise GatewayError.unsupported("tools and function calling are not supported", "tools")
    if req.top_logprobs:
        raise GatewayError.unsupported("top_logprobs is not supported (only the sampled token's logprob)",
                                       "top_logprobs")
    if req.response_format is not None and req.response_format.type != TEXT_RESPONSE_FORMAT:
        raise GatewayError.unsupported("only response_format text is supported", "response_format")
    for i, message in enumerate(req.messages):
        if message.tool_calls or message.tool_call_id or message.role == "tool":
            raise GatewayError.unsupported("tool messages are not supported", f"messages.{i}")
        if isinstance(message.content, list) and any(isinstance(p, ImagePart) for p in message.content):
            raise GatewayError.unsupported("images and other non-text content are not supported",
                                           f"messages.{i}.content")


# ---- requests ----------------------------------------------------------------------------------


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _sampling_fields(req: _Sampling) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "temperature": DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        "stop": _stop_list(req.stop),
        "stream": req.stream,
    }
    for name in ("top_p", "top_k", "seed", "ignore_eos", "kv_quant", "attention"):
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    return fields


def _generate_request(fields: dict[str, Any]) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise GatewayError.from_validation(exc) from None


def completion_prompt(prompt: str | list) -> dict[str, Any]:
    """`prompt` as the NATS API takes it: a string, token ids, or a list of exactly one of them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise GatewayError.unsupported("a batch of prompts is not supported: send one prompt per request",
                                           "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise GatewayError.invalid("prompt must not be empty", "prompt")
        return {"prompt": prompt}
    if not prompt:
        raise GatewayError.invalid("prompt must not be empty", "prompt")
    return {"input_ids": prompt}


def completion_to_generate(req: CompletionRequest, request_id: str) -> GenerateRequest:
    _refuse_unsupported_completion(req)
    return _generate_request({
        **completion_prompt(req.prompt),
        **_sampling_fields(req),
        "max_new_tokens": req.max_tokens,
        "logprobs": req.logprobs is not None,
        "request_id": request_id,
    })


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as chat templates read them: content a string (text parts joined)."""
    messages = []
    for message in req.messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        messages.append(entry)
    return messages


def chat_to_generate(req: ChatCompletionRequest, request_id: str, template: ChatTemplate | None,
                     tokenizer: PromptTokenizer | None, default_max_tokens: int) -> GenerateRequest:
    """Rendered with the chat template and tokenized here (no special tokens added: the template
    writes BOS), so the scheduler receives exactly transformers' token ids."""
    _refuse_unsupported_chat(req)
    if template is None or tokenizer is None:
        raise GatewayError.unsupported("this model has no chat template: use /v1/completions", "messages")
    try:
        prompt = template.render(chat_messages(req), add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise GatewayError.invalid(f"the chat template refused these messages: {exc}", "messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    return _generate_request({
        "input_ids": tokenizer.encode_rendered(prompt),
        **_sampling_fields(req),
        "max_new_tokens": max_tokens,
        "logprobs": req.logprobs,
        "request_id": request_id,
    })


# ---- replies -----------------------------------------------------------------------------------


def usage_body(usage: Usage) -> UsageBody:
    return UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details={"cached_tokens": usage.cached_tokens},
    )


def reply_text(reply: GenerateReply) -> str:
    """The text of a reply; the ids in brackets when the model has no tokenizer."""
    return reply.text if reply.text is not None else "".join(f"[{i}]" for i in reply.output_ids)


def _token_strings(reply: GenerateReply, tokenizer: PromptTokenizer | None) -> list[str]:
    return [tokenizer.token_text(i) if tokenizer else f"[{i}]" for i in reply.output_ids]


def completion_logprobs(reply: GenerateReply, tokenizer: PromptTokenizer | None) -> CompletionLogprobs | None:
    if reply.logprobs is None:
        return None
    tokens = _token_strings(reply, tokenizer)
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=list(reply.logprobs), text_offset=offsets)


def chat_logprobs(reply: GenerateReply, tokenizer: PromptTokenizer | None) -> ChatLogprobs | None:
    if reply.logprobs is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
        for token, logprob in zip(_token_strings(reply, tokenizer), reply.logprobs)
    ])


def completion_response(reply: GenerateReply, model: str, created: int,
                        tokenizer: PromptTokenizer | None = None) -> CompletionResponse:
    return CompletionResponse(
        id=COMPLETION_ID_PREFIX + reply.request_id, created=created, model=model,
        choices=[CompletionChoice(text=reply_text(reply), finish_reason=reply.finish_reason,
                                  logprobs=completion_logprobs(reply, tokenizer))],
        usage=usage_body(reply.usage),
    )


def chat_response(reply: GenerateReply, model: str, created: int,
                  tokenizer: PromptTokenizer | None = None) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=CHAT_ID_PREFIX + reply.request_id, created=created, model=model,
        choices=[ChatChoice(message=AssistantMessage(content=reply_text(reply)), finish_reason=reply.finish_reason,
                            logprobs=chat_logprobs(reply, tokenizer))],
        usage=usage_body(reply.usage),
    )
