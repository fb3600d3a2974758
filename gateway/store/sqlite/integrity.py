"""Never start over silently: refuse a damaged database file, create a missing one atomically.

SQLite treats a zero-length file as an empty database, so a truncated or zeroed file would be
"migrated" into a fresh one and every open incident and pending outbox item would vanish
without a word. So:

* every connection first looks at the file (`check_file`): an existing file that is empty is
  refused with StoreError (SMTP 451, exit 75), and one that is not a SQLite database fails
  SQLite's own header check as the connection opens. Only `stat` is used here, never open():
  closing any descriptor of the database file drops every POSIX lock this process holds on
  it, including those of its live SQLite connections (lost writes, as the SQLite docs warn);
* a database is created only where no file exists, and atomically (`create_database`): the
  schema is built in a temporary file that is then hard-linked into place, so a crash, or
  another process looking at the same moment, never sees a half-made database;
* `verify` adds `PRAGMA quick_check` (every page and index, but cheaper than integrity_check),
  which `serve` and `gateway check` run once at start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from gateway.errors import StoreError

QUICK_CHECK_LINES = 3  # problems quoted in the message; the rest are counted

_ADVICE = (
    "refusing to use it (starting over would drop the open incidents and pending outbox items"
    " without a word). Restore it from a backup, or move it away to start with a new one"
)


def check_file(path: Path) -> bool:
    """True if `path` exists (SQLite checks its header as it opens it), False if not;
    StoreError if it is empty or not a file."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot read database {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise StoreError(f"database {path} is not a file")
    if status.st_size == 0:
        raise StoreError(f"database {path} exists but is empty (0 bytes): {_ADVICE}")
    return True


def not_a_database(path: Path) -> StoreError:
    """What to say when SQLite finds no valid header in an existing file."""
    return StoreError(f"{path} is not a SQLite database (bad header): {_ADVICE}")


def ensure_database(path: Path, build: Callable[[sqlite3.Connection], None]) -> None:
    """Refuse a damaged file; create a missing database (schema built by `build`)."""
    if check_file(path):
        return
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size:
        raise StoreError(
            f"database {path} is missing but its write-ahead log {wal} is not: the database was"
            f" deleted or moved without it; {_ADVICE} (move the -wal and -shm files too)"
        )
    create_database(path, build)


def create_database(path: Path, build: Callable[[sqlite3.Connection], None]) -> None:
    """Build a new database next to `path` and link it into place; if another process created
    one meanwhile, theirs is kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    try:
        _build(temporary, build)
        _link(temporary, path)
        _sync_directory(path.parent)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot create database {path}: {exc}") from None
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                temporary.with_name(temporary.name + suffix).unlink()


def _link(temporary: Path, path: Path) -> None:
    """Give the new database its name: a hard link is atomic and never replaces a database
    another process created meanwhile (theirs is kept); a file system without hard links gets
    a rename, unless the name appeared meanwhile."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if not path.exists():
            os.replace(temporary, path)


def _build(temporary: Path, build: Callable[[sqlite3.Connection], None]) -> None:
    conn = sqlite3.connect(str(temporary), isolation_level=None)
    try:
        conn.execute("BEGIN")
        build(conn)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")  # the mode is stored in the header
    finally:
        conn.close()
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)  # complete on disk before its name appears
    finally:
        os.close(fd)


def _sync_directory(directory: Path) -> None:
    """Make the new directory entry durable (a power cut must not lose the link)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path) -> str:
    """What `serve` needs of its database, checked once at start; StoreError with what to do,
    else one line saying what was found. A missing database is fine when its directory can be
    created and written (serve creates it); an existing one must be writable and pass
    `PRAGMA quick_check`."""
    existed = path.parent.is_dir()
    check_directory(path.parent)
    if not check_file(path):
        where = "is writable" if existed else "can be created"
        return f"database {path} will be created ({path.parent} {where})"
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _check_writable_file(name)
    problems = _quick_check(path)
    if problems == ["file is not a database"]:
        raise not_a_database(path)
    if problems:
        shown = "; ".join(problems[:QUICK_CHECK_LINES])
        if len(problems) > QUICK_CHECK_LINES:
            shown += f" (and {len(problems) - QUICK_CHECK_LINES} more)"
        raise StoreError(
            f"database {path} is damaged (PRAGMA quick_check: {shown}): {_ADVICE};"
            f" `sqlite3 {path} .recover` may save what is readable"
        )
    return f"database {path}: quick_check ok, {path.stat().st_size / 1e6:.1f} MB"


def _quick_check(path: Path) -> list[str]:
    """The problems `PRAGMA quick_check` lists (none: healthy)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def check_directory(directory: Path) -> None:
    """StoreError unless `directory` exists and takes new files, or can be created: probed with
    a real file (or directory) that is removed again, since permissions alone do not tell
    about read-only mounts or root."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"cannot create {directory}: {existing} is not a directory")
    try:
        if existing == directory:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".gateway-check-") as probe:
                probe.write(b"x")
                probe.flush()
                os.fsync(probe.fileno())
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".gateway-check-"))
    except OSError as exc:
        what = "write to" if existing == directory else f"create {directory} in"
        raise StoreError(f"cannot {what} {existing}: {exc.strerror or exc}") from None


def _check_writable_file(path: Path) -> None:
    """A database (or its -wal/-shm) that `serve` could read but not write fails only at the
    first commit: tell now (a -shm left by root is the classic). Asked without opening it
    (see the module docstring); a read-only mount is refused even for root."""
    try:
        read_only_mount = os.statvfs(path).f_flag & os.ST_RDONLY
    except FileNotFoundError:
        return
    if read_only_mount or not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"cannot write {path}: permission denied or read-only file system")
