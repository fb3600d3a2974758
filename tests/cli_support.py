"""Running the `gateway` command in tests: in-process (fast, with capsys) or as a real process
(exit codes, pipes, dropped privileges), against a config whose secrets come from the
environment as in production."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from tests.conftest import ROOT, ROUTING_KEY, write_config

# what the service's environment holds and an on-call engineer's shell does not
SECRETS = {"PD_ROUTING_KEY": ROUTING_KEY, "IMAP_PASSWORD": "imap-secret"}
IMAP_ACCOUNT = """
[[imap]]
name = "desk-mailbox"
host = "127.0.0.1"
service = "helpdesk"
username = "desk"
password = "${IMAP_PASSWORD}"
"""


def config_with_secrets(directory: Path, pd_url: str | None = None) -> Path:
    """A config like production's: the routing key and the IMAP password are `${VAR}`s."""
    return write_config(
        directory, pd_url=pd_url, routing_key="${PD_ROUTING_KEY}", extra=IMAP_ACCOUNT
    )


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Cli:
    """`gateway --config CONFIG ...` in this process; the environment holds no secrets unless
    a call passes `secrets=True` (as the service's own would)."""

    def __init__(
        self, config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.config = config
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.db = config.parent / "data" / "gateway.sqlite3"
        for name in SECRETS:
            monkeypatch.delenv(name, raising=False)

    def __call__(self, *args: str, secrets: bool = False) -> Result:
        self.capsys.readouterr()
        with self.monkeypatch.context() as env:
            for name, value in SECRETS.items() if secrets else ():
                env.setenv(name, value)
            code = main(["--config", str(self.config), *args])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def ingest(self, raw: bytes, *extra: str) -> Result:
        path = self.config.parent / "in.eml"
        path.write_bytes(raw)
        result = self("ingest", str(path), "--service", "helpdesk", *extra, secrets=True)
        assert result.code == 0, result
        return result


def ingest_in_a_process(config: Path, raw: bytes) -> None:
    """`gateway ingest` as its own process: when it exits its connection is closed and the
    database is one file again (no -wal or -shm), as a stopped service leaves it."""
    path = config.parent / "in.eml"
    path.write_bytes(raw)
    result = run_gateway(
        "--config", str(config), "ingest", str(path), "--service", "helpdesk", env=SECRETS
    )
    assert result.returncode == 0, result.stderr


def run_gateway(
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    stdout: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real `gateway` command as an operator runs it (`prefix`: e.g. dropped privileges)."""
    environment = {k: v for k, v in os.environ.items() if k not in SECRETS}
    command = [*prefix, sys.executable, "-m", "gateway.cli", *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env={**environment, **(env or {})},
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


def without_root_powers(*capabilities: str) -> list[str]:
    """A command prefix that takes away what lets root ignore file modes (or bind low ports),
    so a test running as root meets the restrictions an operator's account has."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is needed to drop root's capabilities")
        pytest.skip("setpriv (util-linux) is not installed")
    return ["setpriv", f"--bounding-set=-{',-'.join(capabilities)}"]
