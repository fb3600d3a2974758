"""Deciding: pending jobs in order, one decision per job, incidents, atomic units."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.store import JobDecision, Store
from tests.store_support import incident, mail


def test_pending_jobs_come_oldest_first(store: Store) -> None:
    accepted = store.accept([mail(f"m{i}", raw=f"mail {i}".encode()) for i in range(5)])
    jobs = store.pending_jobs()
    assert [j.message for j in jobs] == [a.id for a in accepted]
    assert [j.raw for j in jobs] == [f"mail {i}".encode() for i in range(5)]
    assert [j.message for j in store.pending_jobs(2)] == [a.id for a in accepted[:2]]


def test_pending_jobs_are_bounded_by_size(store: Store) -> None:
    store.accept([mail(f"big{i}", raw=b"x" * 1000) for i in range(10)])
    assert len(store.pending_jobs(100, max_bytes=2500)) == 3  # 0, 1000, 2000 bytes before each
    assert len(store.pending_jobs(100, max_bytes=1)) == 1  # always at least one
    assert len(store.pending_jobs(4)) == 4


def pending(store: Store) -> set[int]:
    """The ids of the jobs still waiting for their decision."""
    return {job.id for job in store.pending_jobs()}


def test_a_job_is_decided_once(store: Store) -> None:
    store.accept([mail("one")])
    job = store.pending_jobs()[0]
    with store.transaction():
        assert store.finish_job(JobDecision(job.id, outcome="unmatched", reason="no rule matched"))
    with store.transaction():
        assert not store.finish_job(JobDecision(job.id, outcome="triggered", reason="again"))
    assert store.jobs()[0].outcome == "unmatched"


def test_finish_job_records_the_decision(store: Store) -> None:
    store.accept([mail("one"), mail("two")])
    first, second = store.pending_jobs()
    assert first.id in pending(store)
    trace = [{"rule": "new case", "matched": True, "reason": "body contains"}]
    with store.transaction():
        store.finish_job(
            JobDecision(
                first.id,
                outcome="triggered",
                reason="rule 'new case'",
                rule="new case",
                action="trigger",
                incident_key="Printer",
                summary="Printer on fire",
                severity="critical",
                details={"case": "29"},
                trace=trace,
            )
        )
    assert first.id not in pending(store)
    assert [j.id for j in store.pending_jobs()] == [second.id]
    detail = store.job_detail(first.id)
    assert detail is not None
    assert (detail["outcome"], detail["rule"], detail["action"]) == (
        "triggered",
        "new case",
        "trigger",
    )
    assert (detail["incident_key"], detail["severity"]) == ("Printer", "critical")
    assert (detail["details"], detail["trace"]) == ({"case": "29"}, trace)
    assert store.job_detail(second.id)["details"] == {}  # type: ignore[index]
    assert store.job_detail(10_000) is None


def test_savepoint_undoes_only_its_own_writes(store: Store) -> None:
    store.accept([mail("one"), mail("two")])
    first, second = store.pending_jobs()
    with store.transaction():
        with store.savepoint():
            store.finish_job(JobDecision(first.id, outcome="discarded", reason="ok"))
        with pytest.raises(RuntimeError), store.savepoint():
            store.finish_job(JobDecision(second.id, outcome="triggered", reason="bad"))
            store.add_outbox("pagerduty", "helpdesk", "k", {}, second.id)
            raise RuntimeError("bug while deciding")
    assert first.id not in pending(store)
    assert second.id in pending(store)
    assert store.outbox(("pending", "dead", "done")) == []


def test_decision_and_outbox_item_commit_together(store: Store) -> None:
    store.accept([mail("one")])
    [job] = store.pending_jobs()
    with pytest.raises(RuntimeError), store.transaction():
        store.finish_job(JobDecision(job.id, outcome="triggered", reason="rule"))
        store.save_incident(incident("k"))
        store.add_outbox("pagerduty", "helpdesk", "k", {"n": 1}, job.id)
        raise RuntimeError("crash before commit")
    assert job.id in pending(store)
    assert store.incident("helpdesk", "k") is None
    assert store.outbox() == []


def test_incidents_are_saved_and_loaded(store: Store) -> None:
    assert store.incident("helpdesk", "k") is None
    opened = incident("k", last_message=7, case_message_id="<c@x>")
    store.save_incident(opened)
    assert store.incident("helpdesk", "k") == opened
    assert store.incident("other", "k") is None
    resolved = incident("k", "resolved", at=2000.0, resolve_count=1, last_message=8)
    store.save_incident(resolved)  # the same (service, key): replaced, not added
    assert store.incident("helpdesk", "k") == resolved
    assert store.incidents() == [resolved]


def test_a_batch_of_incidents_is_read_at_once_by_service_and_key(store: Store) -> None:
    """Only the pairs asked for and found; a key of one service is not another's; a batch
    bigger than one query's variables (SQLite) is read whole."""
    saved = [incident(f"k{n}") for n in range(450)]
    for one in saved:
        store.save_incident(one)
    store.save_incident(dataclasses.replace(incident("x"), service="other"))
    asked = [("helpdesk", f"k{n}") for n in range(450)] + [("helpdesk", "x"), ("other", "k1")]
    found = store.incidents_of(asked)
    assert found == {("helpdesk", one.incident_key): one for one in saved}
    assert store.incidents_of([]) == {}


def test_incident_listing_newest_first_and_open_only(store: Store) -> None:
    store.save_incident(incident("old", at=1000.0))
    store.save_incident(incident("acked", "acknowledged", at=3000.0))
    store.save_incident(incident("done", "resolved", at=2000.0))
    assert [i.incident_key for i in store.incidents()] == ["acked", "done", "old"]
    assert [i.incident_key for i in store.incidents(open_only=True)] == ["acked", "old"]
    assert [i.incident_key for i in store.incidents(limit=1)] == ["acked"]
    assert all(i.is_open for i in store.incidents(open_only=True))


def test_event_log(store: Store) -> None:
    [accepted] = store.accept([mail("one")])
    store.log_event("would_send", service="helpdesk", message=accepted.id, incident_key="k",
                    detail="no routing_key")  # fmt: skip
    store.log_event("imap_oversize", service="helpdesk", detail="too big")
    newest, oldest = store.events()
    assert (newest["kind"], newest["message"], newest["detail"]) == (
        "imap_oversize",
        None,
        "too big",
    )
    assert (oldest["kind"], oldest["service"], oldest["incident_key"]) == (
        "would_send",
        "helpdesk",
        "k",
    )
    assert newest["at"] >= oldest["at"] > 0
    assert [e["kind"] for e in store.events(message=accepted.id)] == ["would_send"]
    assert len(store.events(limit=1)) == 1


def test_finish_jobs_records_a_batch_and_leaves_out_a_job_decided_already(store: Store) -> None:
    store.accept([mail(f"batch{i}") for i in range(3)])
    first, second, third = (job.id for job in store.pending_jobs())
    with store.transaction():
        assert store.finish_job(JobDecision(second, outcome="unmatched", reason="earlier"))
    with store.transaction():
        recorded = store.finish_jobs(
            [
                JobDecision(first, outcome="triggered", reason="rule", incident_key="A"),
                JobDecision(second, outcome="triggered", reason="again", incident_key="B"),
                JobDecision(third, outcome="resolved", reason="rule", details={"case": "3"}),
            ]
        )
    assert recorded == {first, third}
    assert store.pending_jobs() == []
    by_id = {job.id: job for job in store.jobs()}
    assert (by_id[first].outcome, by_id[first].incident_key) == ("triggered", "A")
    assert (by_id[second].outcome, by_id[second].reason) == ("unmatched", "earlier")
    assert by_id[third].outcome == "resolved"
    assert store.job_detail(third)["details"] == {"case": "3"}  # type: ignore[index]
    assert store.finish_jobs([]) == set()


def test_lock_incidents_reads_the_incidents_that_exist(store: Store) -> None:
    with store.transaction():
        store.save_incident(incident("Printer"))
        store.save_incident(incident("Disk", "resolved"))
    with store.transaction():
        held = store.lock_incidents(
            [("helpdesk", "Printer"), ("helpdesk", "Nothing"), ("helpdesk", "Disk")]
        )
    assert held == {
        ("helpdesk", "Printer"): store.incident("helpdesk", "Printer"),
        ("helpdesk", "Disk"): store.incident("helpdesk", "Disk"),
    }
    assert store.lock_incidents([]) == {}
