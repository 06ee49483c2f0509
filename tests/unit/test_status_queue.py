"""The wait queue in the status reply: a strict model, and `ringserve status` prints each place."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.cli import terminal
from shared.messages import QueuedRequest, StatusReply


def test_queued_request_is_strict():
    QueuedRequest(request_id="r1", place=1, prefill_tokens=0, waited_s=0.0)
    with pytest.raises(ValidationError):
        QueuedRequest(request_id="r1", place=0, prefill_tokens=5, waited_s=0.0)  # places count from 1
    with pytest.raises(ValidationError):
        QueuedRequest(request_id="r1", place="1", prefill_tokens=5, waited_s=0.0)  # no coercion
    with pytest.raises(ValidationError):
        QueuedRequest(request_id="r1", place=1, prefill_tokens=5, waited_s=0.0, extra=True)


def test_status_reply_reads_old_replies_and_round_trips_the_queue():
    old = {"model": "demo", "workers": [], "queued_requests": 0, "active_requests": 0, "world_generation": 0}
    assert StatusReply.model_validate(old).queue == []
    queue = [QueuedRequest(request_id="short", place=1, prefill_tokens=40, waited_s=0.5),
             QueuedRequest(request_id="long", place=2, prefill_tokens=9000, waited_s=3.25)]
    reply = StatusReply(**old | {"queued_requests": 2}, queue=queue)
    assert StatusReply.model_validate_json(reply.model_dump_json()) == reply


def test_ringserve_status_prints_each_place_in_the_queue():
    status = StatusReply(model="demo", workers=[], queued_requests=2, active_requests=1, world_generation=1,
                         queue=[QueuedRequest(request_id="short", place=1, prefill_tokens=40, waited_s=0.5),
                                QueuedRequest(request_id="long", place=2, prefill_tokens=9000, waited_s=3.25)])
    lines = terminal.format_status(status).splitlines()
    at = lines.index("requests: 1 active, 2 queued")
    assert lines[at + 1: at + 4] == ["  #1  short  40 prefill tokens  waited 0.5s",
                                     "  #2  long  9000 prefill tokens  waited 3.2s",
                                     "workers: 0"]
