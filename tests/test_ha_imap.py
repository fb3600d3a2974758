"""Two nodes on one PostgreSQL store, one IMAP account: one node polls it at a time, and the
other takes over when the holder dies (issue 13, "Wake-ups and single-runners")."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import SEEN

from gateway.store import open_store
from gateway.store.postgres.connection import close_pool
from tests.conftest import GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.dovecot import PASSWORD, Dovecot, require_dovecot
from tests.pdserver import PagerDutyStandIn
from tests.postgres import PostgresServer, require_postgres
from tests.test_imap import _imap_table, folder_state

TAKEOVER_BOUND = 30.0  # the bound for a standby node to take the account over


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    require_dovecot()
    (tmp_path / "dovecot").mkdir()
    server = Dovecot(tmp_path / "dovecot").start()
    try:
        yield server
    finally:
        server.stop()
        print(f"--- dovecot log ---\n{server.output()}", file=sys.stderr)


def node(tmp_path: Path, name: str, pd: PagerDutyStandIn, url: str, imap: str) -> GatewayProcess:
    directory = tmp_path / name
    directory.mkdir()
    port = free_port()
    store = f'[store]\nurl = "{url}"\nnode = "{name}"\n'
    config = write_config(directory, pd_url=pd.url, smtp_port=port, extra=store + imap)
    return GatewayProcess(config, port)


def accepting_nodes(url: str) -> list[str]:
    store = open_store(url, read_only=True)
    try:
        found = [store.message(job.message) for job in store.jobs(limit=1000)]
        return sorted(m.node for m in found if m is not None)
    finally:
        store.close()


def test_one_node_polls_an_account_and_another_takes_over_when_it_dies(
    tmp_path: Path, pd: PagerDutyStandIn, dovecot: Dovecot, postgres_url: str, monkeypatch
) -> None:
    monkeypatch.setenv("TEST_IMAP_PASSWORD", PASSWORD)
    imap = _imap_table(dovecot)
    a = node(tmp_path, "a", pd, postgres_url, imap).start()
    b = None
    try:
        wait_until(lambda: "imap desk: idle" in a.output(), message=a.output())
        b = node(tmp_path, "b", pd, postgres_url, imap).start()
        wait_until(lambda: "another node polls this account" in b.output(), message=b.output())
        dovecot.append(desk_mail("Printer on fire", "New"))
        pd.wait_for(1)
        assert accepting_nodes(postgres_url) == ["a"]  # fetched once, by the holder
        a.kill()  # kill -9: the turn goes with its connection
        dovecot.append(desk_mail("Toner low", "New"))
        pd.wait_for(2, timeout=TAKEOVER_BOUND + 10)
        assert accepting_nodes(postgres_url) == ["a", "b"]
        assert "imap desk: idle" in b.output()
    finally:
        for process in (a, b):
            if process is not None and process.proc is not None and process.proc.poll() is None:
                process.kill()
        close_pool(postgres_url)


def test_imap_flags_nothing_while_postgresql_is_away_and_catches_up_after(
    tmp_path: Path, pd: PagerDutyStandIn, dovecot: Dovecot, monkeypatch
) -> None:
    server = PostgresServer(require_postgres())
    server.start()
    url = server.new_database()
    monkeypatch.setenv("TEST_IMAP_PASSWORD", PASSWORD)
    a = node(tmp_path, "a", pd, url, _imap_table(dovecot)).start()
    try:
        wait_until(lambda: "imap desk: idle" in a.output(), message=a.output())
        server.stop()
        dovecot.append(desk_mail("Printer on fire", "New"))
        wait_until(lambda: "spool commit of 1 message(s) failed" in a.output(), 60)
        assert all(SEEN not in flags for flags in folder_state(dovecot).values())
        server.start()
        [event] = pd.wait_for(1, timeout=90)
        assert event["dedup_key"] == "Printer on fire"
        wait_until(lambda: all(SEEN in f for f in folder_state(dovecot).values()), 30)
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.kill()
        close_pool(url)
        with contextlib.suppress(RuntimeError):
            server.stop()
        server.remove()
