"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) and the HTTP status
of each ringserve error code."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import ValidationError

from shared.messages import ErrorCode

# OpenAI's `code` for a prompt that does not fit; other ringserve codes are passed through as-is.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_API_KEY = "invalid_api_key"
NOT_FOUND = "not_found"

STATUS_BY_CODE: dict[str, HTTPStatus] = {
    ErrorCode.INVALID_REQUEST.value: HTTPStatus.BAD_REQUEST,
    ErrorCode.TOO_LONG.value: HTTPStatus.BAD_REQUEST,
    ErrorCode.UNSUPPORTED.value: HTTPStatus.BAD_REQUEST,
    ErrorCode.OVERLOADED.value: HTTPStatus.TOO_MANY_REQUESTS,
    ErrorCode.UNAVAILABLE.value: HTTPStatus.SERVICE_UNAVAILABLE,
    ErrorCode.TIMEOUT.value: HTTPStatus.GATEWAY_TIMEOUT,
    ErrorCode.INTERNAL.value: HTTPStatus.INTERNAL_SERVER_ERROR,
}

# OpenAI's `type` by HTTP status (its clients pick their exception class by status alone).
_TYPE_BY_STATUS: dict[HTTPStatus, str] = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.NOT_FOUND: "invalid_request_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "service_unavailable_error",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout_error",
    HTTPStatus.INTERNAL_SERVER_ERROR: "server_error",
}


class GatewayError(Exception):
    """An error answered to the HTTP client: status, OpenAI body."""

    def __init__(self, status: HTTPStatus, message: str, code: str, param: str | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @classmethod
    def from_ringserve(cls, code: str, message: str) -> "GatewayError":
        """A ringserve error code (NATS API) as the HTTP error OpenAI clients expect."""
        status = STATUS_BY_CODE.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)
        openai_code = CONTEXT_LENGTH_EXCEEDED if code == ErrorCode.TOO_LONG.value else code
        return cls(status, message, openai_code)

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> "GatewayError":
        return cls(HTTPStatus.BAD_REQUEST, message, ErrorCode.INVALID_REQUEST.value, param)

    @classmethod
    def unsupported(cls, message: str, param: str | None = None) -> "GatewayError":
        return cls(HTTPStatus.BAD_REQUEST, message, ErrorCode.UNSUPPORTED.value, param)

    @classmethod
    def from_validation(cls, exc: ValidationError) -> "GatewayError":
        """The first problem of a request body, with the field it concerns as `param`."""
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return cls.invalid(message, param)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: HTTPStatus, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPE_BY_STATUS.get(status, "server_error"),
                      "param": param, "code": code}}
