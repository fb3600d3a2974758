"""The command line as an operator types it at 3 a.m.: global options anywhere, and one clear
line (never a traceback) for the mistakes an operator makes."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli.serve import start_failure
from tests.cli_support import (
    SECRETS,
    Cli,
    config_with_secrets,
    ingest_in_a_process,
    run_gateway,
    without_root_powers,
)
from tests.conftest import desk_mail, write_config

# -- global options anywhere (--config, --version, --log-format) --------------------------------


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(config_with_secrets(tmp_path), capsys, monkeypatch)


@pytest.mark.parametrize(
    "command",
    [["incidents"], ["check"], ["outbox"], ["messages", "--outcome", "unmatched"]],
    ids=["incidents", "check", "outbox", "messages"],
)
def test_config_is_accepted_after_the_subcommand(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    ingest_in_a_process(cli.config, desk_mail("Printer on fire"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_gateway(*command, "--config", str(cli.config), cwd=elsewhere, env=SECRETS)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", ["check", "incidents", "serve", "test-rules"])
def test_version_is_accepted_before_and_after_the_subcommand(where: str, command: str) -> None:
    args = ["--version", command] if where == "before" else [command, "--version"]
    result = run_gateway(*args, cwd=Path("/"))  # no config needed to say the version
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gateway {__version__}"


def test_log_format_is_accepted_after_the_subcommand(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "human")  # restored after the test
    ingest_in_a_process(cli.config, desk_mail("Printer on fire"))
    assert cli("incidents", "--log-format", "json").code == 0
    assert os.environ["GATEWAY_LOG_FORMAT"] == "json"  # what the worker process follows


def test_an_option_before_the_subcommand_is_kept_when_not_repeated_after(cli: Cli) -> None:
    # `gateway --config X incidents`: the subcommand's own (absent) --config must not reset it
    ingest_in_a_process(cli.config, desk_mail("Printer on fire"))
    result = cli("incidents", secrets=True)
    assert result.code == 0 and "Printer on fire" in result.out


def test_the_last_config_given_wins(cli: Cli, tmp_path: Path) -> None:
    ingest_in_a_process(cli.config, desk_mail("Printer on fire"))
    result = cli("incidents", "--config", str(tmp_path / "missing.toml"))
    assert result.code == 1 and "missing.toml" in result.err


# -- no tracebacks for operator errors -------------------------------------------------------------


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, routing_key=None, smtp_port=port)
        result = run_gateway("--log-format", "json", "--config", str(config), "serve")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if not x.startswith("{")]  # not a log line
    assert line.startswith(f"error: SMTP cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line


def free_privileged_port() -> int:
    """A port below 1024 that nothing listens on (root may bind it, to check)."""
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    if os.environ.get("CI"):
        pytest.fail("no free port below 1024 in CI")
    pytest.skip("no free port below 1024")


def test_serve_on_a_privileged_port_without_the_capability_says_what_grants_it(
    tmp_path: Path,
) -> None:
    prefix = without_root_powers("net_bind_service")
    port = free_privileged_port()
    config = write_config(tmp_path, routing_key=None, smtp_port=port)
    result = run_gateway("--log-format", "json", "--config", str(config), "serve", prefix=prefix)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if not x.startswith("{")]
    assert line.startswith(f"error: SMTP cannot listen on 127.0.0.1:{port}: Permission denied")
    assert "CAP_NET_BIND_SERVICE" in line and "systemd/gateway.service" in line


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EADDRINUSE, "another process listens there"),
        (errno.EACCES, "CAP_NET_BIND_SERVICE"),
        (errno.EADDRNOTAVAIL, "no interface of this host has that address"),
        (errno.EMFILE, "SMTP cannot listen on 10.0.0.1:25: boom"),
    ],
)
def test_start_failures_become_one_line_naming_the_address(code: int, words: str) -> None:
    line = start_failure(OSError(code, "SMTP cannot listen on 10.0.0.1:25: boom"))
    assert line.startswith("SMTP cannot listen on 10.0.0.1:25: boom") and words in line
    assert "\n" not in line


def test_a_reader_that_goes_away_ends_a_listing_quietly(cli: Cli) -> None:
    for n in range(3):
        ingest_in_a_process(cli.config, desk_mail(f"Case {n}"))
    read, write = os.pipe()
    os.close(read)  # `| head` that has already exited: every write fails with EPIPE
    try:
        result = run_gateway("--config", str(cli.config), "messages", stdout=write)
    finally:
        os.close(write)
    assert result.returncode == 141
    assert result.stderr == ""


def test_a_missing_config_says_where_it_looked_and_how_to_pass_one(tmp_path: Path) -> None:
    env = {"GATEWAY_CONFIG": ""}
    for command in (["incidents"], ["serve"], ["check"], ["messages"]):
        result = run_gateway(*command, cwd=tmp_path, env=env)
        assert result.returncode == 1, command
        [line] = result.stderr.splitlines()
        assert line.startswith("error: config.toml: config file not found: ")
        assert f"config.toml (in {tmp_path})" in line and "--config" in line
        assert "GATEWAY_CONFIG" in line


def test_a_listing_started_without_stdout_does_not_crash(cli: Cli) -> None:
    ingest_in_a_process(cli.config, desk_mail("Printer on fire"))
    closed = ["sh", "-c", 'exec "$@" >&-', "sh"]  # `gateway messages >&-`
    result = run_gateway("--config", str(cli.config), "messages", prefix=closed)
    assert result.returncode == 0 and result.stderr == ""
