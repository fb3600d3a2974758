"""Retention: old rows go in batches; what pending work and open incidents need stays."""

from __future__ import annotations

import time

import pytest

from gateway.store import JobDecision, OutboxResult, Store
from tests.store_support import incident, mail

KINDS = ("messages", "jobs", "outbox", "events", "incidents")


class Scene:
    """One mail per reason to keep or purge it; every row is older than `cutoff`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        names = ["decided", "pending", "open_incident", "pending_item", "dead_item", "delivered"]
        accepted = store.accept([mail(name, raw=name.encode()) for name in names])
        self.message = {name: a.id for name, a in zip(names, accepted, strict=True)}
        [self.duplicate] = store.accept([mail("decided")])  # goes with its original
        jobs = {j.message: j.id for j in store.pending_jobs()}
        self.job = {name: jobs[message] for name, message in self.message.items()}
        with store.transaction():
            for name in names:
                if name != "pending":
                    store.finish_job(
                        JobDecision(self.job[name], outcome="triggered", reason="test")
                    )
            pending = store.add_outbox("pagerduty", "helpdesk", "p", {}, self.job["pending_item"])
            dead = store.add_outbox("pagerduty", "helpdesk", "d", {}, self.job["dead_item"])
            done = store.add_outbox("pagerduty", "helpdesk", "o", {}, self.job["delivered"])
            store.save_incident(incident("open", last_message=self.message["open_incident"]))
            store.save_incident(
                incident("closed", "resolved", last_message=self.message["decided"])
            )
            store.log_event("would_send", service="helpdesk", detail="old")
        store.record_outbox(
            [
                OutboxResult(pending, "pending", error="503", next_attempt_at=time.time() + 3600),
                OutboxResult(dead, "dead", response="400"),
                OutboxResult(done, "done", response="202"),
            ]
        )
        self.items = {"pending": pending, "dead": dead, "done": done}
        self.cutoff = time.time() + 10

    def counters(self) -> dict:
        totals = self.store.metric_totals()
        return {(metric, labels): value for metric, labels, value in totals if value}


@pytest.fixture
def scene(store: Store) -> Scene:
    return Scene(store)


EXPECTED = {"messages": 3, "jobs": 2, "outbox": 1, "events": 2, "incidents": 1}


def test_purge_plan_counts_and_changes_nothing(scene: Scene) -> None:
    store = scene.store
    assert store.purge_plan(scene.cutoff) == EXPECTED
    assert store.purge_plan(scene.cutoff) == EXPECTED  # nothing was deleted
    assert store.raw_message(scene.message["decided"]) == b"decided"
    assert store.purge_plan(0.0) == dict.fromkeys(KINDS, 0)  # nothing is that old


def test_purge_keeps_what_is_still_needed(scene: Scene) -> None:
    store = scene.store
    assert store.purge(scene.cutoff) == EXPECTED
    assert store.purge(scene.cutoff) == dict.fromkeys(KINDS, 0)
    for name in ("pending", "open_incident", "pending_item", "dead_item"):
        assert store.raw_message(scene.message[name]) == name.encode(), name
    for name in ("decided", "delivered"):
        assert store.raw_message(scene.message[name]) is None, name
    assert store.job_detail(scene.job["decided"]) is None
    assert store.raw_message(scene.duplicate.id) is None and store.events() == []
    assert [j.id for j in store.pending_jobs()] == [scene.job["pending"]]
    assert [i.id for i in store.outbox()] == [scene.items["pending"], scene.items["dead"]]
    assert [i.incident_key for i in store.incidents()] == ["open"]


def test_purge_goes_in_batches(scene: Scene) -> None:
    store = scene.store
    totals = dict.fromkeys(KINDS, 0)
    rounds = 0
    while any((counts := store.purge(scene.cutoff, batch=1)).values()):
        assert all(n <= 2 for n in counts.values())  # a message at most brings its duplicate
        totals = {kind: totals[kind] + counts[kind] for kind in KINDS}
        rounds += 1
    assert totals == EXPECTED and rounds > 1


def test_counters_survive_the_purge(scene: Scene) -> None:
    before = scene.counters()
    assert before[("accepted", ())] == 7
    scene.store.purge(scene.cutoff)
    assert scene.counters() == before
