"""Operations: systemd units and the notify protocol, hot reload, retention, replay, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import EX_OK, main
from gateway.logs import JsonFormatter
from gateway.store import Store, open_store
from tests.conftest import ROOT, GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.ops_support import metric, running, web_config, worker_pid
from tests.pdserver import PagerDutyStandIn

IN_CI = os.environ.get("CI") == "true"
OLD = time.time() - 40 * 86400  # older than the default retention_days = 30


# -- systemd ------------------------------------------------------------------------------------


def test_systemd_units_verify_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` needs ExecStart to exist: point it at a stub in tmp."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("systemd-analyze missing in CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze not installed")
    stub = tmp_path / "bin" / "gateway"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = sorted((ROOT / "systemd").glob("*.service")) + sorted(
        (ROOT / "systemd").glob("*.socket")
    )
    assert units
    for unit in units:
        text = unit.read_text().replace("/opt/gateway/bin/gateway", str(stub))
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # unknown keys are only warnings (exit 0): "clean" means no output at all
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_is_hardened_as_documented() -> None:
    text = (ROOT / "systemd" / "gateway.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "StateDirectory=gateway",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "SystemCallFilter=@system-service",
    ):
        assert f"\n{line}\n" in text, line


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A fake $NOTIFY_SOCKET (short path: unix socket names are limited to 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="gw-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()
    shutil.rmtree(directory)


def smtp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(100).startswith(b"220")
    except OSError:
        return False


def test_notify_protocol(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    port = free_port()
    config = write_config(tmp_path, smtp_port=port, extra='[web]\nlisten = ""\n')
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1"), first
        assert smtp_accepts(port), "READY=1 before the SMTP port accepted connections"
        pings = 0
        while pings < 3:  # WATCHDOG=1 every WATCHDOG_USEC / 2
            pings += sock.recv(4096) == b"WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        while (message := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- reload ---------------------------------------------------------------------------------------

IGNORE_RULE = """
[[rule]]
name = "ignore maintenance"
conditions = [ { field = "subject", op = "contains", value = "maintenance" } ]
action = "discard"

"""
BAD_RULE = """
[[rule]]
name = "broken"
conditions = [ { field = "subject", op = "resembles", value = "x" } ]
action = "discard"

"""


def outcome_of(db: Path, subject_word: str) -> tuple[str, str] | None:
    """(outcome, rule) of the newest decided job whose mail contains `subject_word`."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT j.outcome, COALESCE(j.rule, '') FROM jobs j JOIN messages m ON m.id = j.message"
            " WHERE j.state = 'done' AND instr(m.raw, ?) > 0 ORDER BY j.id DESC LIMIT 1",
            (subject_word.encode(),),
        ).fetchone()
    return tuple(row) if row else None


def test_reload_good_bad_and_sighup_during_a_session(tmp_path: Path, pd: PagerDutyStandIn) -> None:
    config, port, _ = web_config(tmp_path, pd.url, web='listen = ""', own_rules=True)
    rules = tmp_path / "rules" / "helpdesk.toml"
    original = rules.read_text()
    db = tmp_path / "data" / "gateway.sqlite3"
    gateway = GatewayProcess(config, port).start()
    try:
        # a good change to the rule file is picked up without a signal
        rules.write_text(IGNORE_RULE + original)
        # mail is decided by the worker: its switch, not the main process's line, counts
        wait_until(
            lambda: "worker running generation 2" in gateway.output(), message=gateway.output()
        )
        send(port, desk_mail("Planned maintenance tonight"))
        assert wait_until(lambda: outcome_of(db, "maintenance tonight")) == (
            "discarded",
            "ignore maintenance",
        )
        # a bad change is refused with file:line, and the last good rules keep working
        rules.write_text(IGNORE_RULE + BAD_RULE + original)
        wait_until(lambda: "refused" in gateway.output(), message=gateway.output())
        assert f"{rules}:" in gateway.output() and "resembles" in gateway.output()
        send(port, desk_mail("More maintenance"))
        assert wait_until(lambda: outcome_of(db, "More maintenance")) == (
            "discarded",
            "ignore maintenance",
        )
        # SIGHUP while an SMTP session is between RCPT and DATA: the session still gets 250
        rules.write_text(original)
        wait_until(
            lambda: "worker running generation 3" in gateway.output(), message=gateway.output()
        )
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            client.mail("support@helpdesk.example")
            client.rcpt("desk@gateway.example")
            gateway.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reloaded (SIGHUP)" in gateway.output(), message=gateway.output())
            code, _ = client.data(desk_mail("Maintenance window over"))
        assert code == 250
        assert wait_until(lambda: outcome_of(db, "Maintenance window over"))[0] == "triggered"
        assert gateway.proc.poll() is None
    finally:
        gateway.stop()


def test_reload_logs_restart_required(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, smtp_port=port, extra='[web]\nlisten = ""\n')
    gateway = GatewayProcess(config, port).start()
    try:
        config.write_text(config.read_text().replace('hostname = "gateway.test"', 'hostname = "x"'))
        gateway.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "restart required: [smtp]" in gateway.output(), message=gateway.output())
    finally:
        gateway.stop()


def test_a_worker_restarted_after_a_refused_reload_keeps_the_last_good_rules(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    """The worker used to re-read the files when it restarted: a rule file refused by the
    reload made it crash-loop, and no mail was decided until the file was fixed."""
    config, port, _ = web_config(tmp_path, pd.url, web='listen = ""', own_rules=True)
    rules = tmp_path / "rules" / "helpdesk.toml"
    original = rules.read_text()
    rules.write_text(IGNORE_RULE + original)  # generation 1, the last good one
    db = tmp_path / "data" / "gateway.sqlite3"
    gateway = GatewayProcess(config, port).start()
    try:
        wait_until(
            lambda: "worker running generation 1" in gateway.output(), message=gateway.output()
        )
        rules.write_text(IGNORE_RULE + BAD_RULE + original)
        gateway.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "refused" in gateway.output(), message=gateway.output())
        worker = worker_pid(gateway.proc.pid)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: "exited with -9" in gateway.output(), message=gateway.output())
        send(port, desk_mail("Planned maintenance tonight"))
        send(port, desk_mail("Printer on fire"))
        assert wait_until(lambda: outcome_of(db, "maintenance tonight")) == (
            "discarded",
            "ignore maintenance",
        )
        assert wait_until(lambda: outcome_of(db, "Printer on fire")) == ("triggered", "new case")
        assert gateway.output().count("worker process exited") == 1  # restarted once, no loop
        assert worker_pid(gateway.proc.pid) not in (None, worker)
    finally:
        gateway.stop()


def test_parent_and_worker_run_the_same_generation(tmp_path: Path, pd: PagerDutyStandIn) -> None:
    config, port, web_port = web_config(tmp_path, pd.url, own_rules=True)
    rules = tmp_path / "rules" / "helpdesk.toml"
    with running(config, port, web_port) as gateway:
        wait_until(
            lambda: "worker running generation 1" in gateway.output(), message=gateway.output()
        )
        rules.write_text(IGNORE_RULE + rules.read_text())
        wait_until(
            lambda: "worker running generation 2" in gateway.output(), message=gateway.output()
        )
        parent = re.findall(r"reloaded \(changed: [^)]*\): generation (\d+)", gateway.output())
        assert parent == ["2"]
        _, text = gateway.get("/metrics")
        assert metric(text, "gateway_config_generation") == 2
        gateway.send(desk_mail("Planned maintenance tonight"))
        db = tmp_path / "data" / "gateway.sqlite3"
        assert wait_until(lambda: outcome_of(db, "maintenance tonight")) == (
            "discarded",
            "ignore maintenance",
        )


def send(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("support@helpdesk.example", ["desk@gateway.example"], raw)


# -- retention, replay (in-process, through the CLI) --------------------------------------------


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys
        self.db = config.parent / "data" / "gateway.sqlite3"

    def __call__(self, *args: str) -> str:
        self.capsys.readouterr()
        assert main(["--config", str(self.config), *args]) == EX_OK
        out = self.capsys.readouterr()
        return out.out + out.err

    def ingest(self, raw: bytes) -> str:
        path = self.config.parent / "in.eml"
        path.write_bytes(raw)
        return self("ingest", str(path), "--service", "helpdesk")

    def rows(self, table: str) -> int:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.fixture
def cli(tmp_path: Path, pd: PagerDutyStandIn, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(write_config(tmp_path, pd_url=pd.url), capsys)


def counters(store: Store) -> dict[tuple, float]:
    return {(metric, labels): value for metric, labels, value in store.metric_totals() if value}


def test_retention_keeps_what_is_still_needed(cli: Cli) -> None:
    cli.ingest(desk_mail("Printer on fire"))  # stays open: its message must be kept
    cli.ingest(desk_mail("Disk full", message_id="<disk@helpdesk.example>"))
    cli.ingest(desk_mail("Disk full", message_id="<disk@helpdesk.example>"))  # duplicate
    cli.ingest(desk_mail("Disk full", "Resolved"))
    with sqlite3.connect(cli.db) as conn:  # everything happened 40 days ago
        conn.execute("UPDATE messages SET received_at = ?", (OLD,))
        conn.execute("UPDATE events SET at = ?", (OLD,))
        conn.execute("UPDATE outbox SET updated_at = ?, created_at = ?", (OLD, OLD))
        conn.execute("UPDATE incidents SET last_seen = ?", (OLD,))
    before = {t: cli.rows(t) for t in ("messages", "jobs", "outbox", "incidents")}
    totals_before = counters(open_store(cli.db))

    out = cli("purge", "--dry-run")
    assert "would delete (older than 30 days): 3 messages, 2 jobs" in out
    assert {t: cli.rows(t) for t in before} == before  # dry run changed nothing

    out = cli("purge")
    assert "deleted (older than 30 days): 3 messages, 2 jobs" in out
    assert cli.rows("messages") == 1 and cli.rows("jobs") == 1
    assert cli.rows("outbox") == 0  # delivered items go, pending/dead ones would stay
    assert cli.rows("events") == 0
    store = open_store(cli.db)
    (incident,) = store.incidents()
    assert incident.incident_key == "Printer on fire" and incident.is_open
    assert store.raw_message(incident.last_message)  # the open incident's mail is still there
    assert counters(store) == totals_before  # counters never go down
    assert "0 messages, 0 jobs" in cli("purge", "--dry-run")


def test_retention_never_touches_pending_work(cli: Cli, pd: PagerDutyStandIn) -> None:
    pd.fail_next(100, 500)  # PagerDuty down: the trigger stays pending in the outbox
    cli.ingest(desk_mail("Printer on fire"))
    cli.ingest(desk_mail("Printer on fire", "Resolved"))
    with sqlite3.connect(cli.db) as conn:
        conn.execute("UPDATE messages SET received_at = ?", (OLD,))
        conn.execute("UPDATE outbox SET updated_at = ?, created_at = ?", (OLD, OLD))
    assert "0 messages, 0 jobs" in cli("purge")
    assert cli.rows("outbox") == 2 and cli.rows("messages") == 2


def test_replay_shows_what_a_candidate_ruleset_would_change(
    cli: Cli, pd: PagerDutyStandIn, tmp_path: Path
) -> None:
    cli.ingest(desk_mail("Printer on fire"))
    cli.ingest(desk_mail("Planned maintenance tonight"))
    cli.ingest(desk_mail("Printer on fire", "Resolved"))
    sent = len(pd.requests)
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    original = (ROOT / "parsing_rules" / "helpdesk.toml").read_text()
    (candidate / "helpdesk.toml").write_text(IGNORE_RULE + original)

    out = cli("replay", "--since", "1h")
    assert "no differences" in out and "3 message(s) replayed, 0 would change" in out

    out = cli("replay", "--since", "1h", "--rules", str(candidate))
    assert "3 message(s) replayed, 1 would change" in out
    (line,) = [x for x in out.splitlines() if "maintenance" in x]
    assert "trigger rule='new case' key='Planned maintenance tonight'" in line
    assert "discarded rule='ignore maintenance'" in line
    assert "Printer" not in out.split("would now be")[1].split("message(s)")[0]

    out = cli("replay", "--since", "1h", "--rules", str(candidate / "helpdesk.toml"), "--all")
    assert len([x for x in out.splitlines() if "Printer on fire" in x]) == 2  # unchanged, listed
    assert len(pd.requests) == sent  # replay never sends
    assert cli.rows("jobs") == 3


def test_replay_refuses_an_invalid_candidate(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_RULE)
    assert main(["--config", str(cli.config), "replay", "--rules", str(bad)]) == 1
    assert f"{bad}:" in capsys.readouterr().err


# -- logs -----------------------------------------------------------------------------------------


def test_json_log_lines_carry_structured_fields() -> None:
    record = logging.LogRecord("gateway.processor", logging.INFO, __file__, 1, "done", (), None)
    fields = {"message_id": 7, "source": "smtp", "service": "helpdesk", "rule": "new case"}
    record.__dict__.update(fields, action="trigger", key="Printer", outcome="triggered")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "done" and entry["level"] == "info"
    assert {k: entry[k] for k in fields} == fields
    assert (entry["action"], entry["key"], entry["outcome"]) == ("trigger", "Printer", "triggered")
    assert "args" not in entry and "lineno" not in entry


def test_log_format_option_reaches_the_processor(
    tmp_path: Path, pd: PagerDutyStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    config = write_config(tmp_path, pd_url=pd.url, smtp_port=port, extra='[web]\nlisten = ""\n')
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "json")  # what `gateway --log-format json` sets
    gateway = GatewayProcess(config, port).start()
    try:
        send(port, desk_mail("Printer on fire"))
        pd.wait_for(1)

        def decision_line() -> dict | None:
            for line in gateway.output().splitlines():
                if line.startswith("{") and '"outcome"' in line:
                    return json.loads(line)
            return None

        entry = wait_until(decision_line, message=gateway.output())
        assert entry["logger"] == "gateway.decide.processor"
        assert entry["source"] == "smtp" and entry["service"] == "helpdesk"
        assert (entry["rule"], entry["action"], entry["outcome"]) == (
            "new case",
            "trigger",
            "triggered",
        )
        assert entry["key"] == "Printer on fire" and isinstance(entry["message_id"], int)
    finally:
        gateway.stop()
