"""Streaming in OpenAI's Server-Sent Events shapes: `text_completion` chunks for completions,
`chat.completion.chunk` for chat (a first delta with the role, then content deltas), a last
chunk with the finish reason, a usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. An error after the stream began is one `data: {"error": ...}` event before it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from services.gateway.errors import GatewayError
from services.gateway.openai_models import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
)
from services.gateway.translate import CHAT_ID_PREFIX, COMPLETION_ID_PREFIX, usage_body
from shared.client import Event, RingserveError
from shared.messages import DoneEvent, TokenEvent

MEDIA_TYPE = "text/event-stream"
DONE_LINE = b"data: [DONE]\n\n"
# Proxies (nginx) buffer responses unless told not to; a stream must reach the client per token.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
StreamKind = Literal["completion", "chat"]


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


@dataclass
class ChunkShapes:
    """Builds the chunks of one stream (all share its id, creation time and model)."""

    kind: StreamKind
    request_id: str
    created: int
    model: str
    include_usage: bool = False

    @property
    def id(self) -> str:
        return (CHAT_ID_PREFIX if self.kind == "chat" else COMPLETION_ID_PREFIX) + self.request_id

    def _chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
               logprob: tuple[str, float] | None = None) -> BaseModel:
        if self.kind == "chat":
            logprobs = None
            if logprob is not None:
                token, value = logprob
                logprobs = ChatLogprobs(content=[ChatTokenLogprob(token=token, logprob=value,
                                                                  bytes=list(token.encode()))])
            delta = ChatDelta(role="assistant" if role else None, content=text)
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason,
                                                                logprobs=logprobs)])
        logprobs = None
        if logprob is not None:
            token, value = logprob
            logprobs = CompletionLogprobs(tokens=[token], token_logprobs=[value], text_offset=[0])
        return CompletionChunk(id=self.id, created=self.created, model=self.model,
                               choices=[CompletionChoice(text=text or "", finish_reason=finish_reason,
                                                         logprobs=logprobs)])

    def opening(self) -> list[BaseModel]:
        """Chat streams open with the assistant's role; completions have no opening chunk."""
        return [self._chunk("", role=True)] if self.kind == "chat" else []

    def token(self, text: str, logprob: tuple[str, float] | None = None) -> BaseModel:
        return self._chunk(text, logprob=logprob)

    def finish(self, finish_reason: str, tail: str = "") -> BaseModel:
        """The last choice chunk; `tail` is text the tokens held back (an incomplete character)."""
        return self._chunk(tail if tail or self.kind == "completion" else None, finish_reason=finish_reason)

    def usage(self, done: DoneEvent) -> BaseModel:
        model = ChatCompletionChunk if self.kind == "chat" else CompletionChunk
        return model(id=self.id, created=self.created, model=self.model, choices=[], usage=usage_body(done.usage))

    def dump(self, chunk: BaseModel) -> bytes:
        """With include_usage, every chunk carries `usage` (null but the last), as OpenAI's do."""
        exclude = set() if self.include_usage else {"usage"}
        return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n".encode()


@dataclass
class StreamOutcome:
    """What the stream ended with, for the request's log line and metrics."""

    done: DoneEvent | None = None
    error: GatewayError | None = None
    disconnected: bool = False
    printed: list[str] = field(default_factory=list)


def unprinted_tail(final_text: str | None, printed: str) -> str:
    """Final text beyond the streamed increments (a token's bytes held back mid-character)."""
    if final_text and final_text.startswith(printed):
        return final_text[len(printed):]
    return ""


async def sse_chunks(events: AsyncIterator[Event], shapes: ChunkShapes, outcome: StreamOutcome,
                     token_name: Callable[[int], str]) -> AsyncIterator[bytes]:
    """The SSE bytes of one request's NATS events. `token_name` gives a token's own text for
    logprobs. Ends with [DONE] after a done event or an error."""
    for chunk in shapes.opening():
        yield shapes.dump(chunk)
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                text = event.text if event.text is not None else f"[{event.token_id}]"
                outcome.printed.append(text)
                logprob = (token_name(event.token_id), event.logprob) if event.logprob is not None else None
                if text or logprob:
                    yield shapes.dump(shapes.token(text, logprob))
            elif isinstance(event, DoneEvent):
                outcome.done = event
                tail = unprinted_tail(event.text, "".join(outcome.printed))
                yield shapes.dump(shapes.finish(event.finish_reason, tail))
                if shapes.include_usage:
                    yield shapes.dump(shapes.usage(event))
                break
    except RingserveError as exc:
        outcome.error = GatewayError.from_ringserve(exc.code, exc.message)
        yield sse_event(outcome.error.body())
    yield DONE_LINE
