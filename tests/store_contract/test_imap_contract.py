"""IMAP positions: where each (account, folder) stands."""

from __future__ import annotations

from gateway.store import Store
from tests.store_support import Backend


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
