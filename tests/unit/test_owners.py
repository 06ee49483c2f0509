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


def test_a_request_that_ended_here_waits_for_its_owner_to_speak_again():
    watch = OwnerWatch(timeout_s=2.0)
    watch.on_heartbeat("s1", now=0.0)
    watch.on_heartbeat("s2", now=0.0)
    watch.own("alive", "s1", now=0.5)
    watch.own("dead", "s2", now=0.5)
    watch.ended("alive", now=1.0)
    watch.ended("dead", now=1.0)
    watch.ended("never-owned", now=1.0)  # not led here: nothing to watch
    assert watch.settled() == [] and watch.was_ended("dead") and not watch.was_ended("never-owned")
    watch.on_heartbeat("s1", now=1.5)  # s1 lived past the end: it sent the client its reply
    assert watch.settled() == ["alive"]
    watch.forget("alive")
    assert watch.orphans(now=2.4) == []
    assert watch.orphans(now=2.6) == ["dead"]  # s2 silent since it took the request: its client heard nothing
