"""IMAP positions: where each (account, folder) stands."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.store import ImapPosition, Store
from tests.store_support import Backend, counts, mail


def test_a_folder_never_polled_has_no_position(store: Store) -> None:
    assert store.imap_position("desk", "INBOX") is None


def test_positions_are_saved_per_account_and_folder(backend: Backend) -> None:
    store = backend.open()
    store.save_imap_position("desk", "INBOX", 12345, 0)
    store.save_imap_position("desk", "INBOX", 12345, 7)  # advanced
    store.save_imap_position("desk", "Other", 99, 3)
    store.save_imap_position("ops", "INBOX", 5, 1)
    again = backend.open()
    assert again.imap_position("desk", "INBOX") == (12345, 7)
    assert again.imap_position("desk", "Other") == (99, 3)
    assert again.imap_position("ops", "INBOX") == (5, 1)


def test_a_new_uidvalidity_replaces_the_position(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 1, 50)
    store.save_imap_position("desk", "INBOX", 2, 0)
    assert store.imap_position("desk", "INBOX") == (2, 0)


def test_marking_success_keeps_the_position(store: Store) -> None:
    store.mark_imap_success("desk", "INBOX")  # before any position: harmless
    store.save_imap_position("desk", "INBOX", 1, 4)
    store.mark_imap_success("desk", "INBOX")
    store.mark_imap_success("desk", "INBOX", at=1000.0)
    assert store.imap_position("desk", "INBOX") == (1, 4)


# -- the position commits with the batch (issue 11, item 2) ------------------------------------


def position(last_uid: int, **fields: Any) -> ImapPosition:
    return ImapPosition("desk", "INBOX", 7, last_uid, **fields)


def test_accept_saves_the_position_in_the_same_commit(backend: Backend) -> None:
    store = backend.open()
    [accepted] = store.accept([mail("a")], [position(3, unfinished=(3,))])
    again = backend.open()
    assert again.imap_position("desk", "INBOX") == (7, 3)
    assert again.imap_unfinished("desk", "INBOX") == [3]
    assert [job.message for job in again.pending_jobs()] == [accepted.id]


def test_a_failed_acceptance_saves_no_position(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 7, 2)
    with pytest.raises(RuntimeError), store.transaction():
        store.accept([mail("a")], [position(3)])
        raise RuntimeError("crash before commit")
    assert store.imap_position("desk", "INBOX") == (7, 2)
    assert counts(store)["messages"] == 0


def test_a_position_alone_can_be_accepted(store: Store) -> None:
    assert store.accept([], [position(9)]) == []
    assert store.imap_position("desk", "INBOX") == (7, 9)


def test_after_action_done_forgets_the_unfinished_uids(store: Store) -> None:
    store.accept([mail("a"), mail("b")], [position(5, unfinished=(4, 5))])
    store.imap_after_done("desk", "INBOX")
    assert store.imap_unfinished("desk", "INBOX") == []
    assert store.imap_position("desk", "INBOX") == (7, 5)
    assert store.imap_unfinished("desk", "Other") == []  # never polled: nothing due


# -- owed UIDs: failures, reports, vanishing (issue 11, item 1) ---------------------------------


def test_a_failure_is_owed_counted_and_due_again(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 7, 0)
    assert store.record_imap_failure("desk", "INBOX", 2, "FETCH failed", 100.0) == 1
    assert store.record_imap_failure("desk", "INBOX", 2, "FETCH failed again", 200.0) == 2
    [owed] = store.imap_owed("desk", "INBOX")
    assert (owed.uid, owed.attempts, owed.next_attempt_at) == (2, 2, 200.0)
    assert (owed.error, owed.reported_at) == ("FETCH failed again", None)
    assert owed.first_failed_at <= owed.last_failed_at
    assert store.imap_owed("desk", "Other") == []


def test_accepting_an_owed_uid_resolves_it(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 7, 0)
    store.record_imap_failure("desk", "INBOX", 2, "no body", 100.0)
    store.record_imap_failure("desk", "INBOX", 3, "no body", 100.0)
    store.accept([mail("b")], [position(4, resolved=(2,))])
    assert [f.uid for f in store.imap_owed("desk", "INBOX")] == [3]


def test_reporting_marks_it_and_logs_an_event(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 7, 0)
    store.record_imap_failure("desk", "INBOX", 2, "no body", 100.0)
    store.report_imap_failure("desk", "INBOX", 2, service="helpdesk", detail="UID 2 unreadable")
    [failure] = store.imap_failures()
    assert failure.reported_at is not None
    [event] = store.events()
    assert (event["kind"], event["service"], event["detail"]) == (
        "imap_unreadable",
        "helpdesk",
        "UID 2 unreadable",
    )


def test_a_vanished_uid_is_forgotten_with_an_event(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 7, 0)
    store.record_imap_failure("desk", "INBOX", 2, "no body", 100.0)
    store.forget_imap_failure("desk", "INBOX", 2, service="helpdesk", detail="UID 2 is gone")
    assert store.imap_owed("desk", "INBOX") == []
    assert store.events()[0]["kind"] == "imap_vanished"


def test_a_new_uidvalidity_forgets_what_the_old_one_owed(store: Store) -> None:
    store.accept([mail("a")], [position(5, unfinished=(5,))])
    store.record_imap_failure("desk", "INBOX", 2, "no body", 100.0)
    store.record_imap_failure("ops", "INBOX", 2, "no body", 100.0)  # another account keeps its
    store.save_imap_position("desk", "INBOX", 8, 0)
    assert store.imap_owed("desk", "INBOX") == []
    assert store.imap_unfinished("desk", "INBOX") == []
    assert [f.account for f in store.imap_failures()] == ["ops"]


def test_failure_gauges_per_polled_account(store: Store) -> None:
    store.save_imap_position("desk", "INBOX", 7, 0)
    store.save_imap_position("quiet", "INBOX", 1, 0)
    store.record_imap_failure("desk", "INBOX", 2, "no body", 100.0)
    store.record_imap_failure("desk", "INBOX", 3, "no body", 100.0)
    store.report_imap_failure("desk", "INBOX", 3, service="helpdesk", detail="unreadable")
    gauges = {(m, labels): v for m, labels, v in store.metric_gauges() if m.startswith("imap_")}
    assert gauges == {
        ("imap_failing", ("desk",)): 2,
        ("imap_unreadable", ("desk",)): 1,
        ("imap_failing", ("quiet",)): 0,
        ("imap_unreadable", ("quiet",)): 0,
    }
