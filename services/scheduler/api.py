"""The public request contract: decode and validate a `ringserve.v1.generate` body into a request
the scheduler can run, or a coded error. Pure functions, no NATS."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ValidationError

from shared import codec
from shared.attention.pattern import KeyPattern, layer_pattern
from shared.messages import CancelRequest, ErrorBody, ErrorCode, ErrorReply, GenerateRequest, ModelInfo
from shared.errors import error_text
from shared.settings import Settings


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def reply(self) -> ErrorReply:
        return ErrorReply(error=ErrorBody(code=self.code, message=self.message, request_id=self.request_id))


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_generate(data: bytes, content_type_header: str | None, settings: Settings) -> tuple[GenerateRequest, str]:
    """Bytes -> GenerateRequest; raises ApiError(invalid_request) for anything malformed."""
    content_type = codec.public_content_type(data, content_type_header)
    if len(data) > settings.max_request_bytes:
        raise ApiError(ErrorCode.INVALID_REQUEST,
                       f"body of {len(data)} bytes exceeds the limit of {settings.max_request_bytes} bytes")
    try:
        body = codec.load_public(data, content_type)
    except codec.CodecError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, error_text(exc)) from None
    if not isinstance(body, dict):
        raise ApiError(ErrorCode.INVALID_REQUEST, "the body must be an object")
    client_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    try:
        return GenerateRequest.model_validate(body), content_type
    except ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, describe(exc), client_id) from None


def parse_cancel(data: bytes, content_type: str) -> CancelRequest:
    """Bytes -> CancelRequest; raises ApiError(invalid_request) for anything malformed."""
    try:
        return CancelRequest.model_validate(codec.load_public(data, content_type))
    except codec.CodecError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, error_text(exc)) from None
    except ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, describe(exc)) from None


def check_limits(req: GenerateRequest, prompt_ids: list[int], model: ModelInfo, settings: Settings, request_id: str) -> None:
    """Semantic checks that need the model: vocabulary, context and generation limits."""
    if req.max_new_tokens > settings.max_new_tokens_limit:
        raise ApiError(ErrorCode.INVALID_REQUEST,
                       f"max_new_tokens {req.max_new_tokens} exceeds the limit {settings.max_new_tokens_limit}", request_id)
    bad = [t for t in prompt_ids if t >= model.vocab_size]
    if bad:
        raise ApiError(ErrorCode.INVALID_REQUEST,
                       f"token id {bad[0]} is outside the vocabulary (size {model.vocab_size})", request_id)
    bad_stop = [t for t in req.stop_token_ids if t >= model.vocab_size]
    if bad_stop:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"stop token id {bad_stop[0]} is outside the vocabulary", request_id)
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise ApiError(ErrorCode.TOO_LONG,
                       f"prompt of {len(prompt_ids)} tokens exceeds the maximum of {settings.max_prompt_tokens}", request_id)
    if len(prompt_ids) + req.max_new_tokens > model.max_position_embeddings:
        raise ApiError(ErrorCode.TOO_LONG,
                       f"prompt ({len(prompt_ids)}) + max_new_tokens ({req.max_new_tokens}) exceeds the model's "
                       f"context of {model.max_position_embeddings} tokens", request_id)
    check_attention(req, model, request_id)


def check_attention(req: GenerateRequest, model: ModelInfo, request_id: str) -> None:
    """A request's pattern replaces the model's attention in every layer: on a model with its own
    sliding window, only a pattern with that same window keeps the model's sliding layers as they
    were trained (a wider one would let them see keys they never saw, a narrower one is another
    model), so any other window is `unsupported`."""
    pattern = req.attention.key_pattern() if req.attention is not None else None
    if pattern is None or model.sliding_window is None or pattern.window == model.sliding_window:
        return
    raise ApiError(ErrorCode.UNSUPPORTED,
                   f"attention window {pattern.window} differs from this model's own sliding window of "
                   f"{model.sliding_window} tokens: ask for window {model.sliding_window}, or for mode 'full'",
                   request_id)


def layer_patterns(req: GenerateRequest, model: ModelInfo) -> list[KeyPattern | None]:
    """The pattern each of the model's layers runs for this request (None: full causal)."""
    pattern = req.attention.key_pattern() if req.attention is not None else None
    sliding = set(model.sliding_layers)
    return [layer_pattern(pattern, model.sliding_window if i in sliding else None) for i in range(model.num_layers)]


# A prefill command beyond its token ids: plan, segments, sampling, headers (generous).
PREFILL_COMMAND_OVERHEAD_BYTES = 64 * 1024
# One stored KV block's reference in a command (hash chain digest, layer range).
KV_BLOCK_REF_BYTES = 128
# The most msgpack takes for a token id (uint32): a bound, not an encoding of the prompt.
MSGPACK_TOKEN_ID_BYTES = 5


def check_fits_bus(prompt_ids: list[int], max_payload: int, settings: Settings, request_id: str) -> None:
    """A ring member's prefill command carries (at most) the whole prompt's ids and its block
    references in one NATS message: refuse what cannot fit before any member is sent one (a
    member that got its command would otherwise wait on one that did not)."""
    blocks = -(-len(prompt_ids) // settings.kv_block_tokens)
    need = (MSGPACK_TOKEN_ID_BYTES * len(prompt_ids) + PREFILL_COMMAND_OVERHEAD_BYTES
            + KV_BLOCK_REF_BYTES * blocks)
    if need > max_payload:
        raise ApiError(ErrorCode.TOO_LONG, f"a prompt of {len(prompt_ids)} tokens needs prefill commands of up to "
                       f"{need} bytes, over the bus max_payload of {max_payload} (raise the NATS server's "
                       "max_payload)", request_id)


def new_request_id(req: GenerateRequest) -> str:
    return req.request_id or f"req-{uuid.uuid4().hex[:16]}"


def encode_reply(message: BaseModel, content_type: str) -> bytes:
    return codec.dump_public(message, content_type)
