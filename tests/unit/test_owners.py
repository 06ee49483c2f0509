"""A worker ends the requests whose scheduler went silent: the bookkeeping."""

from __future__ import annotations

from services.worker.owners import OwnerWatch


def test_a_request_is_an_orphan_once_its_scheduler_is_silent_for_the_timeout():
    watch = OwnerWatch(timeout_s=4.0)
    watch.on_heartbeat("s1", now=100.0)
    watch.own("r1", "s1", now=100.5)
    watch.own("r2", "s2", now=100.5)  # s2 never heard from: silent since the request came
    assert watch.orphans(now=104.0) == []
    watch.on_heartbeat("s1", now=104.0)
    assert watch.orphans(now=105.0) == ["r2"]
    assert watch.orphans(now=108.5) == ["r1", "r2"]
    watch.forget("r2")
    watch.on_heartbeat("s1", now=108.6)
    assert watch.orphans(now=109.0) == []


def test_a_request_newer_than_its_schedulers_last_beat_gets_the_full_timeout():
    watch = OwnerWatch(timeout_s=4.0)
    watch.on_heartbeat("s1", now=100.0)
    watch.own("r1", "s1", now=110.0)  # the scheduler restarted its beats after a pause, say
    assert watch.orphans(now=113.0) == []
    assert watch.orphans(now=114.5) == ["r1"]
