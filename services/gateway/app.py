"""The HTTP endpoints (a Starlette app): each request is authorised, parsed strictly, translated
to the NATS API (translate.py), sent with RingserveClient and answered as JSON or as an SSE
stream (sse.py). Every request gets a `gateway.request` span, a metric and one log event."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import structlog
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from services.gateway import sse
from services.gateway.auth import check_authorization
from services.gateway.chat_template import ChatTemplate
from services.gateway.errors import NOT_FOUND, GatewayError, error_body
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.openai_models import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from services.gateway.prompt_tokens import PromptTokenizer
from services.gateway.tracing import SPAN_NAME, http_context
from services.gateway.translate import chat_response, chat_to_generate, completion_response, completion_to_generate
from shared.client import Event, RingserveClient, RingserveError
from shared.messages import GenerateRequest

log = structlog.get_logger("gateway")

REQUEST_ID_PREFIX = "gw-"
MS_PER_S = 1000.0


def new_request_id() -> str:
    """Set by the gateway, so that a client's disconnect can cancel the request by its id."""
    return REQUEST_ID_PREFIX + uuid.uuid4().hex


def json_response(body: BaseModel | dict[str, Any], status: int = HTTPStatus.OK) -> Response:
    content = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return Response(content, status_code=status, media_type="application/json")


@dataclass
class GatewayDeps:
    """What the endpoints use; built by main.py."""

    client: RingserveClient
    metrics: GatewayMetrics
    tracer: trace.Tracer
    api_keys: tuple[str, ...]
    max_request_bytes: int
    default_max_tokens: int
    template: ChatTemplate | None = None
    tokenizer: PromptTokenizer | None = None
    # cancels sent for disconnected clients: kept referenced until they finish
    background: set[asyncio.Task] = field(default_factory=set)


@dataclass
class Exchange:
    """One HTTP request as the log line and the metric see it."""

    endpoint: str
    span: trace.Span
    started: float = field(default_factory=time.perf_counter)
    request_id: str | None = None
    stream: bool = False


class Gateway:
    def __init__(self, deps: GatewayDeps):
        self.deps = deps
        self.created = int(time.time())

    # ---- plumbing: span, auth, errors, metric and log of every request -------------------------

    def _finish(self, exchange: Exchange, status: int, **fields: Any) -> None:
        latency_ms = (time.perf_counter() - exchange.started) * MS_PER_S
        self.deps.metrics.record(exchange.endpoint, status, latency_ms)
        exchange.span.set_attribute("http.status_code", status)
        if exchange.request_id:
            exchange.span.set_attribute("request_id", exchange.request_id)
        with trace.use_span(exchange.span, end_on_exit=True):
            log.info("http_request", endpoint=exchange.endpoint, status=status, request_id=exchange.request_id,
                     stream=exchange.stream, latency_ms=round(latency_ms, 2), **fields)

    def endpoint(self, name: str, handler: Callable[[Request, Exchange], Awaitable[Response]],
                 authorised: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            span = self.deps.tracer.start_span(SPAN_NAME, context=http_context(request.headers),
                                               kind=trace.SpanKind.SERVER,
                                               attributes={"http.route": name, "http.method": request.method})
            exchange = Exchange(name, span)
            with trace.use_span(span, end_on_exit=False):
                try:
                    if authorised:
                        check_authorization(request.headers.get("authorization"), self.deps.api_keys)
                    response = await handler(request, exchange)
                except GatewayError as exc:
                    span.set_status(trace.StatusCode.ERROR, exc.message)
                    self._finish(exchange, exc.status, code=exc.code, error=exc.message[:300])
                    return json_response(exc.body(), exc.status)
                except Exception as exc:  # a bug must answer 500 in OpenAI's shape, not a bare page
                    log.exception("gateway_failed", endpoint=name)
                    self._finish(exchange, HTTPStatus.INTERNAL_SERVER_ERROR, code="internal")
                    return json_response(error_body(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc)[:300], "internal"),
                                         HTTPStatus.INTERNAL_SERVER_ERROR)
            if not isinstance(response, StreamingResponse):
                self._finish(exchange, response.status_code)
            return response

        return serve

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > self.deps.max_request_bytes:
            raise GatewayError.invalid(f"request body over {self.deps.max_request_bytes} bytes")
        try:
            return model.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise GatewayError.invalid(f"body is not JSON: {exc}") from None
        except RecursionError:
            raise GatewayError.invalid("body is not JSON: nested too deeply") from None
        except ValidationError as exc:
            raise GatewayError.from_validation(exc) from None

    # ---- generation, plain or streamed -------------------------------------------------------

    async def _generate(self, exchange: Exchange, req: GenerateRequest, kind: sse.StreamKind, model: str,
                        include_usage: bool) -> Response:
        exchange.request_id, exchange.stream = req.request_id, req.stream
        if not req.stream:
            try:
                reply = await self.deps.client.generate(req)
            except RingserveError as exc:
                raise GatewayError.from_ringserve(exc.code, exc.message) from None
            build = chat_response if kind == "chat" else completion_response
            return json_response(build(reply, model, int(time.time()), self.deps.tokenizer))
        events = self.deps.client.stream(req)
        try:
            # The first event is awaited here: an error before any token (overloaded, too long)
            # still gets its HTTP status instead of a 200 stream holding an error.
            first = await anext(events)
        except RingserveError as exc:
            raise GatewayError.from_ringserve(exc.code, exc.message) from None
        shapes = sse.ChunkShapes(kind, req.request_id, int(time.time()), model, include_usage)
        return StreamingResponse(self._stream(exchange, first, events, shapes), media_type=sse.MEDIA_TYPE,
                                 headers=sse.STREAM_HEADERS)

    async def _stream(self, exchange: Exchange, first: Event, events: AsyncIterator[Event],
                      shapes: sse.ChunkShapes) -> AsyncIterator[bytes]:
        async def all_events() -> AsyncIterator[Event]:
            yield first
            async for event in events:
                yield event

        outcome = sse.StreamOutcome()
        token_name = self.deps.tokenizer.token_text if self.deps.tokenizer else (lambda i: f"[{i}]")
        try:
            async for chunk in sse.sse_chunks(all_events(), shapes, outcome, token_name):
                yield chunk
        except BaseException:
            # The client went away (Starlette cancels the stream): cancel the request on the
            # scheduler. A task of its own, as awaiting here would be cancelled again.
            if outcome.done is None and outcome.error is None:
                outcome.disconnected = True
                task = asyncio.create_task(self._cancel(exchange.request_id))
                self.deps.background.add(task)
                task.add_done_callback(self.deps.background.discard)
            raise
        finally:
            status = outcome.error.status if outcome.error else HTTPStatus.OK
            self._finish(exchange, status, disconnected=outcome.disconnected,
                         finish=outcome.done.finish_reason if outcome.done else None,
                         code=outcome.error.code if outcome.error else None)

    async def _cancel(self, request_id: str | None) -> None:
        if request_id is None:
            return
        try:
            await self.deps.client.cancel(request_id)
            log.info("client_disconnected", request_id=request_id, cancelled=True)
        except RingserveError as exc:
            log.warning("cancel_failed", request_id=request_id, error=exc.message)

    # ---- endpoints ---------------------------------------------------------------------------

    async def completions(self, request: Request, exchange: Exchange) -> Response:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        req = completion_to_generate(body, new_request_id())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._generate(exchange, req, "completion", body.model, include_usage)

    async def chat_completions(self, request: Request, exchange: Exchange) -> Response:
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        req = chat_to_generate(body, new_request_id(), self.deps.template, self.deps.tokenizer,
                               self.deps.default_max_tokens)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._generate(exchange, req, "chat", body.model, include_usage)

    async def models(self, request: Request, exchange: Exchange) -> Response:
        try:
            status = await self.deps.client.status()
        except RingserveError as exc:
            raise GatewayError.from_ringserve(exc.code, exc.message) from None
        cards = [ModelCard(id=status.model, created=self.created)] if status.model else []
        return json_response(ModelList(data=cards))

    async def health(self, request: Request, exchange: Exchange) -> Response:
        """Up while the gateway's NATS connection is: without it no request can be served."""
        if self.deps.client.nc.is_connected:
            return json_response({"status": "ok"})
        return json_response({"status": "nats disconnected"}, HTTPStatus.SERVICE_UNAVAILABLE)

    async def metrics(self, request: Request, exchange: Exchange) -> Response:
        return Response(self.deps.metrics.exposition(), media_type=CONTENT_TYPE)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", HTTPStatus.NOT_FOUND)
        return json_response(error_body(HTTPStatus(status), f"{request.method} {request.url.path}: "
                                        f"{HTTPStatus(status).phrase}", NOT_FOUND), status)


def build_app(deps: GatewayDeps) -> Starlette:
    gateway = Gateway(deps)
    routes = [
        Route("/v1/models", gateway.endpoint("models", gateway.models), methods=["GET"]),
        Route("/v1/completions", gateway.endpoint("completions", gateway.completions), methods=["POST"]),
        Route("/v1/chat/completions", gateway.endpoint("chat_completions", gateway.chat_completions),
              methods=["POST"]),
        Route("/health", gateway.endpoint("health", gateway.health, authorised=False), methods=["GET"]),
        Route("/metrics", gateway.endpoint("metrics", gateway.metrics, authorised=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: gateway.not_found, 405: gateway.not_found})
