"""A damaged database is refused, never started over; `gateway check` checks what serve needs.

SQLite opens a zero-length file as an empty database: without these checks a zeroed or
truncated file became a fresh database, and every open incident and pending outbox item
vanished without a word.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.cli import EX_OK, EX_TEMPFAIL, main
from gateway.errors import StoreError
from gateway.store import open_store, verify_store
from tests.conftest import ROOT, desk_mail, write_config

PAGE = 4096


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, routing_key=None)


def db_of(config: Path) -> Path:
    return config.parent / "data" / "gateway.sqlite3"


def gateway(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    """`gateway serve` as a process: it must refuse before listening, so it exits by itself."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def with_one_incident(config: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    mail = config.parent / "in.eml"
    mail.write_bytes(desk_mail("VPN down"))
    assert gateway(config, capsys, "ingest", str(mail), "--service", "helpdesk")[0] == EX_OK
    return db_of(config)


def damage_the_incidents_table(db: Path) -> None:
    """Overwrite the b-tree header of the incidents table's root page, as a bad disk would."""
    store = open_store(db)
    root = store.conn.execute(  # type: ignore[attr-defined]
        "SELECT rootpage FROM sqlite_master WHERE name = 'incidents'"
    ).fetchone()[0]
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[attr-defined]
    store.close()
    with db.open("r+b") as file:
        file.seek((root - 1) * PAGE)
        file.write(b"\xff" * 64)


def test_an_empty_database_file_is_refused_not_started_over(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = db_of(config)
    db.parent.mkdir()
    db.touch()
    with pytest.raises(StoreError, match="exists but is empty"):
        open_store(db)
    code, out = gateway(config, capsys, "incidents")
    assert code == EX_TEMPFAIL and "is empty (0 bytes)" in out and "backup" in out
    mail = config.parent / "in.eml"
    mail.write_bytes(desk_mail("VPN down"))
    assert gateway(config, capsys, "ingest", str(mail), "--service", "helpdesk")[0] == EX_TEMPFAIL
    assert gateway(config, capsys, "check")[0] == EX_TEMPFAIL
    result = serve(config)
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert "is empty (0 bytes)" in result.stderr and "Traceback" not in result.stderr
    assert db.stat().st_size == 0, "the file was left as it was found"


def test_a_file_that_is_not_a_database_is_refused(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = db_of(config)
    db.parent.mkdir()
    db.write_bytes(b"incidents: VPN down\n" * 100)
    with pytest.raises(StoreError, match="not a SQLite database"):
        open_store(db)
    code, out = gateway(config, capsys, "check")
    assert code == EX_TEMPFAIL and "not a SQLite database" in out


def test_a_damaged_database_is_refused_by_serve_and_check(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = with_one_incident(config, capsys)
    assert gateway(config, capsys, "check")[0] == EX_OK
    damage_the_incidents_table(db)
    code, out = gateway(config, capsys, "check")
    assert code == EX_TEMPFAIL and "is damaged (PRAGMA quick_check:" in out and ".recover" in out
    result = serve(config)
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert "is damaged" in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_page_a_command_reads_is_one_line_and_exit_75(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage_the_incidents_table(with_one_incident(config, capsys))
    code, out = gateway(config, capsys, "incidents")
    assert code == EX_TEMPFAIL
    assert (
        out.strip()
        == "error: database damaged: database disk image is malformed; run `gateway check`"
    )


def test_a_missing_database_is_created_complete_and_only_once(tmp_path: Path) -> None:
    db = tmp_path / "new" / "gateway.sqlite3"
    opened, errors = [], []

    def open_one() -> None:
        try:
            opened.append(open_store(db))
        except Exception as exc:  # pragma: no cover - the failure is asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(opened) == 8
    with opened[0].transaction():
        opened[0].log_event("test", detail="written by one")
    assert [e["detail"] for e in opened[-1].events()] == ["written by one"]  # one database
    for store in opened:
        store.close()
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    assert sorted(p.name for p in db.parent.iterdir()) == ["gateway.sqlite3"]  # no temporaries


def test_a_database_deleted_without_its_wal_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    db.with_name("gateway.sqlite3-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 28)
    with pytest.raises(StoreError, match="write-ahead log"):
        open_store(db)
    assert not db.exists()


def test_check_says_the_database_will_be_created_without_creating_it(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = gateway(config, capsys, "check")
    assert code == EX_OK
    assert f"OK: database {db_of(config)} will be created ({db_of(config).parent} can be" in out
    assert not db_of(config).parent.exists()


def test_check_reports_a_healthy_database(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with_one_incident(config, capsys)
    code, out = gateway(config, capsys, "check")
    assert code == EX_OK and f"OK: database {db_of(config)}: quick_check ok" in out


def test_check_refuses_a_data_dir_that_cannot_be_created(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config.parent / "data").write_text("a file where the data_dir should be")
    code, out = gateway(config, capsys, "check")
    assert code == EX_TEMPFAIL and "is not a directory" in out


@pytest.mark.skipif(sys.platform != "linux", reason="read-only bind mount")
def test_check_refuses_a_data_dir_on_a_read_only_mount(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Permissions alone say nothing for root or a read-only mount: the check writes a file."""
    data = config.parent / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(data), str(data)], check=False)
    if mounted.returncode != 0:
        if os.environ.get("CI"):  # CI runs as root: it must run this, not skip it
            pytest.fail("cannot bind-mount a read-only directory in CI")
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        code, out = gateway(config, capsys, "check")
    finally:
        subprocess.run(["umount", str(data)], check=True)
    assert code == EX_TEMPFAIL and f"cannot write to {data}" in out and "Read-only" in out


def test_verify_store_passes_a_fresh_and_a_used_database(tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    assert "will be created" in verify_store(db)
    open_store(db).close()
    assert "quick_check ok" in verify_store(db)
