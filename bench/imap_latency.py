"""IMAP intake benchmark against a real Dovecot on loopback.

1. Latency: APPEND -> PagerDuty stand-in POST through `gateway serve` with IDLE, one message at a
   time, p50/p99 over 100 messages (goal: p99 < 2 s). Dovecot itself waits about 0.5 s before it
   tells an IDLE client about new mail, so that is the floor.
2. Throughput: drain a folder holding 5,000 queued messages (goal: >= 300 msg/s), measured
   (a) for the poller alone (fetch, spool commit, +FLAGS \\Seen, position) in-process, and
   (b) through `gateway serve`: spool acceptance rate and time until every PagerDuty event is out.

Run: python bench/imap_latency.py   (needs dovecot-imapd; takes a minute or two)
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import ImapSettings  # noqa: E402
from gateway.intake.imap import ImapPoller  # noqa: E402
from gateway.intake.spool import SpoolWriter  # noqa: E402
from tests.conftest import GatewayProcess, desk_mail, write_config  # noqa: E402
from tests.dovecot import PASSWORD, USER, Dovecot, dovecot_available  # noqa: E402
from tests.net import free_port  # noqa: E402
from tests.pdserver import PagerDutyStandIn  # noqa: E402

LATENCY_MESSAGES = 100
DRAIN_MESSAGES = 5000


def imap_table(server: Dovecot) -> str:
    return f"""
[[imap]]
name = "desk"
host = "{server.host}"
port = {server.port}
security = "none"
username = "{USER}"
password = "{PASSWORD}"
service = "helpdesk"
after = "seen"
idle = true
"""


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def fill(server: Dovecot, count: int, prefix: str) -> None:
    """Queue `count` Desk.com mails with distinct subjects (MULTIAPPEND, 250 per command)."""
    with server.client() as client:
        for start in range(0, count, 250):
            batch = [desk_mail(f"{prefix} {n}") for n in range(start, min(count, start + 250))]
            client.multiappend("INBOX", batch)


def bench_latency(work: Path) -> None:
    server = Dovecot(work / "dovecot-latency").start()
    pd = PagerDutyStandIn().start()
    port = free_port()
    (work / "latency").mkdir()
    config = write_config(work / "latency", pd_url=pd.url, smtp_port=port, extra=imap_table(server))
    gateway = GatewayProcess(config, port).start()
    try:
        wait(lambda: "imap desk: idle" in gateway.output(), 20, "the poller to IDLE")
        latencies = []
        for n in range(LATENCY_MESSAGES):
            subject = f"Latency probe {n}"
            started = time.time()
            server.append(desk_mail(subject))
            wait(lambda n=n: len(pd.requests) > n, 20, f"event {n}")
            latencies.append(pd.requests[n]["at"] - started)
            assert pd.requests[n]["event"]["dedup_key"] == subject
        print(f"latency APPEND -> PagerDuty POST, IDLE, {LATENCY_MESSAGES} messages one at a time:")
        print(
            f"  p50 {statistics.median(latencies) * 1000:.0f} ms   p99 {percentile(latencies, 99) * 1000:.0f} ms"
            f"   max {max(latencies) * 1000:.0f} ms   (goal p99 < 2000 ms)"
        )
    finally:
        gateway.stop()
        pd.stop()
        server.stop()


def bench_poller_drain(work: Path) -> None:
    server = Dovecot(work / "dovecot-drain").start()
    db = work / "drain.sqlite3"
    spool = SpoolWriter(db)
    spool.start()
    try:
        fill(server, DRAIN_MESSAGES, "Queued")
        settings = ImapSettings(
            name="desk", host=server.host, port=server.port, security="none", username=USER,
            password=PASSWORD, service="helpdesk", after="seen",
        )  # fmt: skip
        poller = ImapPoller(settings, spool, db)
        started = time.monotonic()
        poller.start()
        conn = sqlite3.connect(db)
        wait(lambda: _position(conn) >= DRAIN_MESSAGES, 120, "the poller to drain the folder")
        elapsed = time.monotonic() - started
        poller.stop()
        conn.close()
        print(f"drain {DRAIN_MESSAGES} queued messages, poller alone (fetch + spool + \\Seen):")
        print(f"  {elapsed:.2f} s = {DRAIN_MESSAGES / elapsed:.0f} msg/s   (goal >= 300 msg/s)")
    finally:
        spool.stop()
        server.stop()


def _position(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT last_uid FROM imap_state").fetchone()
    return row[0] if row else 0


def bench_serve_drain(work: Path) -> None:
    server = Dovecot(work / "dovecot-serve").start()
    pd = PagerDutyStandIn().start()
    port = free_port()
    directory = work / "serve"
    directory.mkdir()
    config = write_config(directory, pd_url=pd.url, smtp_port=port, extra=imap_table(server))
    fill(server, DRAIN_MESSAGES, "Backlog")
    started = time.monotonic()
    gateway = GatewayProcess(config, port).start()
    try:
        db = directory / "data" / "gateway.sqlite3"
        conn = sqlite3.connect(db)
        wait(lambda: _count(conn) >= DRAIN_MESSAGES, 300, "the spool to hold every message")
        spooled = time.monotonic() - started
        first, last = conn.execute(
            "SELECT MIN(received_at), MAX(received_at) FROM messages"
        ).fetchone()
        wait(lambda: len(pd.events) >= DRAIN_MESSAGES, 600, "every PagerDuty event")
        delivered = time.monotonic() - started
        conn.close()
        print(f"drain {DRAIN_MESSAGES} queued messages through `gateway serve`:")
        print(
            f"  spooled in {spooled:.2f} s from process start ({DRAIN_MESSAGES / spooled:.0f} msg/s);"
            f" acceptance rate first->last {DRAIN_MESSAGES / max(last - first, 1e-9):.0f} msg/s"
        )
        print(
            f"  all {DRAIN_MESSAGES} PagerDuty events sent after {delivered:.2f} s"
            f" ({DRAIN_MESSAGES / delivered:.0f} msg/s end to end)"
        )
    finally:
        gateway.stop(120)
        pd.stop()
        server.stop()


def _count(conn: sqlite3.Connection) -> int:
    try:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    except sqlite3.OperationalError:  # the gateway has not created the schema yet
        return 0


def main() -> None:
    if not dovecot_available():
        raise SystemExit("dovecot not installed (apt-get install dovecot-imapd)")
    work = Path(tempfile.mkdtemp(prefix="imap-bench-"))
    work.chmod(0o755)  # Dovecot's auth process is not us
    try:
        bench_latency(work)
        bench_poller_drain(work)
        bench_serve_drain(work)
    except BaseException:
        print(f"failed; logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
