"""Acceptance: durable, one commit per batch, duplicates by fingerprint per service."""

from __future__ import annotations

import pytest

from gateway.store import JobDecision, Store
from tests.store_support import Backend, counts, mail


def test_reopening_does_not_migrate_twice(backend: Backend) -> None:
    backend.open().accept([mail("a")])
    again = backend.open()
    assert counts(again)["messages"] == 1


def test_accepted_mail_is_durable(backend: Backend) -> None:
    first = backend.open()
    [accepted] = first.accept(
        [mail("a", raw=b"Subject: hi\r\n\r\nbody", mail_from="", rcpt_tos=("desk@x",))]
    )
    first.close()
    [job] = backend.open().pending_jobs()
    assert (job.message, job.service, job.raw) == (
        accepted.id,
        "helpdesk",
        b"Subject: hi\r\n\r\nbody",
    )
    assert (job.mail_from, job.source) == ("", "test")  # the null sender stays distinct from None


def test_group_commit_accepts_a_batch(store: Store) -> None:
    results = store.accept([mail(f"f{i}") for i in range(50)])
    assert [r.duplicate_of for r in results] == [None] * 50
    assert len(store.pending_jobs(1000)) == 50


def test_duplicate_is_recorded_not_queued(store: Store) -> None:
    first, second = store.accept([mail("same", raw=b"body"), mail("same", raw=b"body")])
    assert first.duplicate_of is None
    assert second.duplicate_of == first.id
    assert len(store.pending_jobs()) == 1
    assert store.raw_message(second.id) is None  # the copy's bytes are not kept twice
    assert counts(store)["duplicates"] == 1


def test_duplicate_of_a_decided_mail_is_not_processed_again(store: Store) -> None:
    [first] = store.accept([mail("fp")])
    [job] = store.pending_jobs()
    with store.transaction():
        store.finish_job(JobDecision(job.id, outcome="triggered", reason="rule"))
    [again] = store.accept([mail("fp")])
    assert again.duplicate_of == first.id
    assert store.pending_jobs() == []
    [event] = store.events(message=again.id)
    assert event["kind"] == "duplicate"


def test_same_mail_for_a_new_service_is_not_a_duplicate(store: Store) -> None:
    store.accept([mail("fp", ("a",))])
    result = store.accept([mail("fp", ("a", "b"))])[0]
    assert result.duplicate_of is None
    assert sorted(j.service for j in store.pending_jobs()) == ["a", "b"]


def test_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.accept([mail("x")])
        raise RuntimeError("crash before commit")
    assert counts(store)["messages"] == 0


def test_a_mail_with_nul_in_its_envelope_is_stored(store: Store) -> None:
    """Hostile mail carries NUL bytes in headers; PostgreSQL text cannot hold them."""
    [accepted] = store.accept([mail("nul", mail_from="a\x00b@example.com", message_id="<\x00>")])
    record = store.message(accepted.id)
    assert record is not None and record.mail_from.replace("\ufffd", "\x00") == "a\x00b@example.com"


def test_undecided_jobs_counts_what_waits_for_a_decision(store: Store) -> None:
    """Pacing watches this: one per (mail, service) job, duplicates add none, deciding takes
    one off."""
    assert store.undecided_jobs() == 0
    store.accept([mail("a"), mail("b", services=("helpdesk", "ops")), mail("a")])
    assert store.undecided_jobs() == 3
    first = store.pending_jobs(1)[0]
    with store.transaction():
        assert store.finish_job(
            JobDecision(first.id, outcome="unmatched", reason="no rule matched")
        )
    assert store.undecided_jobs() == 2
