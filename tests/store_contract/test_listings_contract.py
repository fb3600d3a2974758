"""What the CLI listings read: filtered pages with totals, and a store opened read-only."""

from __future__ import annotations

import pytest

from gateway.errors import StoreError, StoreMissing
from gateway.store import Store
from tests.store_contract.test_reports_contract import decide
from tests.store_support import Backend, incident, mail


def test_list_jobs_pages_newest_first_with_the_head_of_each_mail(store: Store) -> None:
    raw = b"Subject: first\r\nFrom: a@b\r\n\r\n" + b"x" * 100
    accepted = store.accept([mail(str(n), raw=raw, mail_from="a@b") for n in range(5)])
    first = store.list_jobs(limit=2, head_bytes=16)
    assert [j.job.message for j in first] == [accepted[4].id, accepted[3].id]
    assert (first[0].head, first[0].mail_from) == (b"Subject: first\r\n", "a@b")
    rest = store.list_jobs(before_job=first[-1].job.id, limit=10)
    assert [j.job.message for j in rest] == [a.id for a in reversed(accepted[:3])]
    assert rest[0].head == raw


def test_list_and_count_jobs_by_outcome_service_and_pending(store: Store) -> None:
    store.accept([mail("a"), mail("b"), mail("c", ("ops",)), mail("d")])
    decide(store, "triggered", "new case")
    decide(store, "unmatched")
    decide(store, "unmatched", service="ops")

    def listed(**filters: object) -> list[tuple[str, str | None]]:
        jobs = store.list_jobs(**filters)  # type: ignore[arg-type]
        assert store.count_jobs(**filters) == len(jobs)  # type: ignore[arg-type]
        return [(j.job.service, j.job.outcome) for j in jobs]

    assert listed(outcomes=["unmatched"]) == [("ops", "unmatched"), ("helpdesk", "unmatched")]
    assert listed(outcomes=["unmatched"], service="helpdesk") == [("helpdesk", "unmatched")]
    assert listed(outcomes=["pending"]) == [("helpdesk", None)]
    assert listed(outcomes=["pending", "triggered"]) == [
        ("helpdesk", None),
        ("helpdesk", "triggered"),
    ]
    assert listed(service="ops") == [("ops", "unmatched")]
    assert listed(service="nobody") == []
    assert store.count_jobs() == 4 and len(store.list_jobs(limit=3)) == 3


def test_known_services_are_those_with_jobs_or_incidents(store: Store) -> None:
    assert store.known_services() == []
    store.accept([mail("a", ("ops",))])
    store.save_incident(incident("k", service="retired"))
    assert store.known_services() == ["ops", "retired"]


def test_incidents_by_service_with_their_count(store: Store) -> None:
    store.save_incident(incident("a", at=1000.0))
    store.save_incident(incident("b", "resolved", at=2000.0))
    store.save_incident(incident("c", at=3000.0, service="ops"))
    assert [i.incident_key for i in store.incidents(service="helpdesk")] == ["b", "a"]
    assert [i.incident_key for i in store.incidents(open_only=True, limit=1)] == ["c"]
    assert store.count_incidents() == 3
    assert store.count_incidents(open_only=True) == 2
    assert store.count_incidents(open_only=True, service="helpdesk") == 1
    assert store.count_incidents(service="nobody") == 0


def test_a_read_only_store_reads_and_refuses_to_write(backend: Backend) -> None:
    writer = backend.open()
    writer.save_incident(incident("a"))
    reader = backend.open(read_only=True)
    assert [i.incident_key for i in reader.incidents()] == ["a"]
    writer.save_incident(incident("b", at=2000.0))
    assert [i.incident_key for i in reader.incidents()] == ["b", "a"]  # sees later commits
    with pytest.raises(StoreError):
        reader.heartbeat()
    with pytest.raises(StoreError), reader.transaction():
        reader.save_incident(incident("c"))
    assert writer.count_incidents() == 2


def test_a_read_only_open_of_a_missing_store_creates_nothing(backend: Backend) -> None:
    with pytest.raises(StoreMissing):
        backend.open(read_only=True)
    writer = backend.open()  # still a fresh store afterwards
    assert writer.count_incidents() == 0
