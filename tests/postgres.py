"""A real PostgreSQL server for the tests: one per session, a fresh database per test.

Debian's `postgresql` package: `initdb` into a temporary directory (as the `postgres` user when
the tests run as root), `pg_ctl start` on a free loopback port with its socket in that
directory, and `pg_ctl -m immediate stop` at the end. Skipped where PostgreSQL is not installed,
but under CI these tests fail instead: there they must run.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import free_port


def pg_bin() -> Path | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> int:
    return int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit() else 0


def require_postgres() -> Path:
    """The server's bin directory; skip without PostgreSQL, but fail under CI."""
    found = pg_bin()
    if found is not None:
        return found
    if os.environ.get("CI"):
        pytest.fail("PostgreSQL is required when CI is set (apt-get install postgresql)")
    pytest.skip("PostgreSQL not installed (apt-get install postgresql)")


class PostgresServer:
    """One running server; `new_database()` gives each test an empty database of its own."""

    def __init__(self, bin_dir: Path, *, fsync: bool = False) -> None:
        """`fsync=False` for tests (a crash of the server process loses nothing either way);
        the benchmark flushes like production."""
        self.fsync = fsync
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", self._user, "--"] if self._user else []
        result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
            )
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300"
            + ("" if self.fsync else " -c fsync=off")
        )
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.dir / "log"), "-w", "start")  # fmt: skip

    def stop(self) -> None:
        """Stop at once (`-m immediate`): also what the failure tests use to take it away."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    @property
    def base_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def pid(self) -> int:
        """The postmaster's pid (its children are the server's backends)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def new_database(self) -> str:
        """A new empty database; its URL."""
        name = f"gw{os.getpid()}_{next(self._names)}"
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "postgres", name)  # fmt: skip
        return f"{self.base_url}/{name}"

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(require_postgres())
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.new_database()
