"""Read-only commands run with what an on-call engineer has: no secrets, read access only.

`incidents`, `messages`, `outbox`, `replay`, `test-rules` and `purge --dry-run` never use the
routing key or the IMAP password and never write: they must not need them, and they must
work on a database they can only read (another user's state directory, a read-only mount).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.store import open_store
from tests.cli_support import (
    Cli,
    config_with_secrets,
    ingest_in_a_process,
    run_gateway,
    without_root_powers,
)
from tests.conftest import desk_mail
from tests.pdserver import PagerDutyStandIn

READ_ONLY_COMMANDS = [
    pytest.param(["incidents"], id="incidents"),
    pytest.param(["messages"], id="messages"),
    pytest.param(["outbox"], id="outbox"),
    pytest.param(["webhooks"], id="webhooks"),
    pytest.param(["replay", "--since", "1h"], id="replay"),
    pytest.param(["purge", "--dry-run"], id="purge-dry-run"),
]
# what lets root read and write files whatever their mode
DAC = ("dac_override", "dac_read_search", "fowner")


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with an incident and an unmatched mail, written by real `gateway ingest`
    processes (so it is one closed file, as a stopped service leaves it); copied per test."""
    directory = tmp_path_factory.mktemp("stored")
    pd = PagerDutyStandIn().start()
    try:
        config = config_with_secrets(directory, pd.url)
        ingest_in_a_process(config, desk_mail("Printer on fire"))
        ingest_in_a_process(config, b"Subject: lunch?\r\nFrom: bob@example.com\r\n\r\nPizza.\r\n")
    finally:
        pd.stop()
    return directory / "data" / "gateway.sqlite3"


@pytest.fixture
def cli(
    tmp_path: Path,
    stored: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    cli = Cli(config_with_secrets(tmp_path), capsys, monkeypatch)
    cli.db.parent.mkdir()
    shutil.copy(stored, cli.db)
    return cli


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS)
def test_read_only_commands_run_without_the_services_secrets(cli: Cli, command: list[str]) -> None:
    result = cli(*command)
    assert result.code == 0, result.err
    assert "PD_ROUTING_KEY" not in result.err and "IMAP_PASSWORD" not in result.err


def test_test_rules_runs_without_the_services_secrets(cli: Cli) -> None:
    path = cli.config.parent / "mail.eml"
    path.write_bytes(desk_mail("Printer on fire"))
    result = cli("test-rules", str(path))
    assert result.code == 0, result.err
    assert "rule:     new case" in result.out


@pytest.mark.parametrize("command", [["check"], ["serve"]], ids=["check", "serve"])
def test_serve_and_check_still_require_every_secret(cli: Cli, command: list[str]) -> None:
    result = cli(*command)
    assert result.code == 1
    assert "environment variable PD_ROUTING_KEY is not set" in result.err
    assert "environment variable IMAP_PASSWORD is not set" in result.err


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """The database directory and every file in it read-only, as another user's would be."""
    files = [p for p in directory.iterdir() if p.is_file()]
    modes = {p: p.stat().st_mode for p in [directory, *files]}
    for path in files:
        path.chmod(0o444)
    directory.chmod(0o555)
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS)
def test_read_only_commands_work_on_a_database_they_can_only_read(
    cli: Cli, command: list[str]
) -> None:
    before = sorted(p.name for p in cli.db.parent.iterdir())
    assert before == ["gateway.sqlite3"]  # the service is stopped: no -wal or -shm file
    with read_only(cli.db.parent):
        result = run_gateway(
            "--config", str(cli.config), *command, prefix=without_root_powers(*DAC)
        )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in cli.db.parent.iterdir()) == before


def test_a_read_only_reader_sees_what_a_running_writer_committed(cli: Cli) -> None:
    writer = open_store(cli.db)  # as `gateway serve` holds it: -wal and -shm exist
    try:
        cli.ingest(desk_mail("Disk full on db-7"))
        assert cli.db.with_name("gateway.sqlite3-shm").exists()
        with read_only(cli.db.parent):
            result = run_gateway(
                "--config", str(cli.config), "incidents", prefix=without_root_powers(*DAC)
            )
    finally:
        writer.close()
    assert result.returncode == 0, result.stderr
    assert "Disk full on db-7" in result.stdout and "Printer on fire" in result.stdout


def test_listing_never_creates_or_changes_the_database(cli: Cli) -> None:
    with contextlib.closing(sqlite3.connect(cli.db)) as conn:
        conn.execute("PRAGMA user_version = 1")  # as if an older gateway had written it
    result = cli("incidents")
    assert result.code == 75 and "schema version 1" in result.err
    with contextlib.closing(sqlite3.connect(cli.db)) as conn:  # not migrated behind our back
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_listing_without_a_database_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = Cli(config_with_secrets(tmp_path), capsys, monkeypatch)
    result = cli("incidents")
    assert result.code == 1
    assert f"no database at {cli.db}" in result.err and "--config" in result.err
    assert not cli.db.parent.exists()  # nothing was created


def test_unreadable_database_is_one_line_that_points_to_the_recipe(cli: Cli) -> None:
    mode = cli.db.stat().st_mode
    cli.db.chmod(0)
    try:
        result = run_gateway(
            "--config", str(cli.config), "messages", prefix=without_root_powers(*DAC)
        )
    finally:
        cli.db.chmod(mode)
    assert result.returncode == 75
    [line] = result.stderr.splitlines()
    assert "permission denied" in line and "read-only recipe" in line
    assert os.access(cli.db, os.R_OK)


def test_without_secrets_only_the_secret_keys_stay_unexpanded(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path)
    text = config.read_text().replace('data_dir = "data"', 'data_dir = "${STATE_DIRECTORY}"')
    config.write_text(text + '\n[outgoing]\npassword = "${RELAY_PASSWORD}"\n')
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    settings = load_config(config, env, secrets=False)
    assert settings.gateway.data_dir == tmp_path / "state"  # not a secret: expanded
    assert settings.services[0].routing_key == "${PD_ROUTING_KEY}"
    assert settings.imap[0].password == "${IMAP_PASSWORD}"
    assert settings.outgoing is not None and settings.outgoing.password == "${RELAY_PASSWORD}"
    with pytest.raises(ConfigError, match="STATE_DIRECTORY is not set"):
        load_config(config, {}, secrets=False)  # what the listings need is still checked
    with pytest.raises(ConfigError, match="RELAY_PASSWORD is not set"):
        load_config(config, env)
