"""Faults: what the gateway does when its worker is killed, its disk fills up, or PagerDuty is
down for a minute. Each prints one result line for bench/RESULTS.md's "Faults" table.

    python bench/faults.py [kill] [disk] [pagerduty]      (all three by default)

* kill: `gateway serve` under load from tests/crash_sender.py (an MTA-like sender that retries
  whatever got no 250); the worker process is frozen (SIGSTOP), what it had claimed is read
  from the store, then it is killed (SIGKILL) and the supervisor restarts it. Counts the
  events sent more than once against those in flight at the kills.
* disk: data_dir on a small tmpfs (needs root for `mount`); mail is sent until the disk is
  full, then the tmpfs is grown. Counts 250s and 451s, checks every 250'd mail is stored and
  reached PagerDuty once the space is back, without a restart.
* pagerduty: the Events API stand-in answers 503 for 60 s while triggers and resolves arrive;
  checks each event is delivered once and each key's resolve after its trigger, and how long
  after PagerDuty came back the last one went out.
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.delivery.outbox import lease_owner
from gateway.store import Store, open_store
from tests.conftest import ROOT, GatewayProcess, desk_mail, wait_until, write_config
from tests.net import free_port
from tests.ops_support import worker_pid
from tests.pdserver import PagerDutyStandIn


def start(directory: Path, pd: PagerDutyStandIn, **config: Any) -> tuple[GatewayProcess, Store]:
    port = free_port()
    path = write_config(directory, pd_url=pd.url, smtp_port=port, **config)
    gateway = GatewayProcess(path, port).start(timeout=60)
    return gateway, open_store(path.parent / "data" / "gateway.sqlite3")


def drained(store: Store) -> bool:
    return store.outbox(("pending",), limit=1) == []


# -- kill -9 of the worker ---------------------------------------------------------------------


def kill_worker(messages: int = 2000, kills: int = 4) -> str:
    with tempfile.TemporaryDirectory() as tmp, _stand_in() as pd:
        gateway, store = start(Path(tmp), pd)
        log = Path(tmp) / "acknowledged.txt"
        sender = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests/crash_sender.py"),
                str(gateway.port),
                str(messages),
                str(log),
            ]
        )
        in_flight: Counter[str] = Counter()
        per_kill = []
        for kill in range(1, kills + 1):
            wait_until(lambda k=kill: len(pd.events) >= k * messages // (kills + 1), timeout=300)
            assert gateway.proc is not None
            pid = wait_until(lambda: worker_pid(gateway.proc.pid), timeout=30)
            os.kill(pid, signal.SIGSTOP)
            claimed = {
                o.payload["dedup_key"]
                for o in store.outbox(("pending",), limit=100_000)
                if o.lease_owner == lease_owner(pid)
            }
            os.kill(pid, signal.SIGKILL)
            in_flight.update(claimed)
            per_kill.append(len(claimed))
            wait_until(lambda p=pid: worker_pid(gateway.proc.pid) not in (None, p), timeout=30)
        sender.wait(timeout=300)
        pd.wait_for(messages, timeout=300)
        wait_until(lambda: drained(store), timeout=120)
        gateway.stop()
        acked = len(set(log.read_text().split()))
        sent = Counter(e["dedup_key"] for e in pd.events)
        resent = sum(n - 1 for n in sent.values())
        over = sum(max(0, n - 1 - in_flight[k]) for k, n in sent.items())
        return (
            f"kill -9 of the worker x{kills} during {messages} mails: {acked} acknowledged,"
            f" {len(sent)} incidents paged ({messages - len(sent)} lost); in flight at the kills"
            f" {per_kill} = {sum(per_kill)}; resent {resent} (beyond in flight: {over})"
        )


# -- disk full ---------------------------------------------------------------------------------


def disk_full(size_mb: int = 4) -> str:
    if os.geteuid() != 0:
        return "disk full: skipped (mounting a tmpfs needs root)"
    with tempfile.TemporaryDirectory() as tmp, _stand_in() as pd:
        data = Path(tmp) / "data"
        data.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(data)], check=True
        )
        try:
            return _fill_the_disk(Path(tmp), data, pd, size_mb)
        finally:
            subprocess.run(["umount", "-l", str(data)], check=False)


def _fill_the_disk(tmp: Path, data: Path, pd: PagerDutyStandIn, size_mb: int) -> str:
    gateway, store = start(tmp, pd)
    replies: Counter[int] = Counter()
    acked: list[str] = []
    n = 0
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        while replies[451] < 20 and n < 100_000:
            subject = f"Disk case {n}"
            n += 1
            try:
                client.sendmail(
                    "a@helpdesk.example",
                    ["desk@gateway.example"],
                    desk_mail(subject, extra="x" * 3000),
                )
                replies[250] += 1
                acked.append(subject)
            except smtplib.SMTPResponseException as exc:
                replies[exc.smtp_code] += 1
                code, text = exc.smtp_code, exc.smtp_error.decode(errors="replace")
    first_refusal = f"{code} {text}" if replies[451] else "-"
    subprocess.run(["mount", "-o", f"remount,size={size_mb * 16}m", str(data)], check=True)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.sendmail(
            "a@helpdesk.example", ["desk@gateway.example"], desk_mail("After the disk was grown")
        )
    acked.append("After the disk was grown")
    pd.wait_for(len(acked), timeout=300)
    wait_until(lambda: drained(store), timeout=120)
    alive = gateway.proc is not None and gateway.proc.poll() is None
    gateway.stop()
    stored = {j.incident_key for j in store.jobs(limit=1_000_000)}
    sent = Counter(e["dedup_key"] for e in pd.events)
    lost = [s for s in acked if s not in stored or sent[s] == 0]
    return (
        f"disk full ({size_mb} MB tmpfs): {replies[250]} x 250, then {replies[451]} x 451"
        f" ('{first_refusal}'), other replies {sum(v for k, v in replies.items() if k not in (250, 451))};"
        f" after growing it: accepted again without restart={alive}; acknowledged but lost {len(lost)};"
        f" paged {len(sent)} of {len(acked)}, sent twice {sum(v > 1 for v in sent.values())}"
    )


# -- PagerDuty down for 60 s -------------------------------------------------------------------


class DownFor(PagerDutyStandIn):
    """The stand-in, answering 503 to everything until `up_at` (time.time())."""

    up_at = 0.0

    def _answer(self, body: bytes) -> tuple[int, str, dict[str, str]]:
        if time.time() < self.up_at:
            with self.cond:
                self.requests.append({"at": time.time(), "event": None})
            return 503, '{"status":"unavailable"}', {}
        return super()._answer(body)


def pagerduty_down(seconds: float = 60.0, incidents: int = 20) -> str:
    pd = DownFor().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gateway, store = start(Path(tmp), pd)
            pd.up_at = time.time() + seconds
            keys = [f"Outage {n}" for n in range(incidents)]
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
                for key in keys:
                    client.sendmail("a@helpdesk.example", ["desk@gateway.example"], desk_mail(key))
                    client.sendmail(
                        "a@helpdesk.example", ["desk@gateway.example"], desk_mail(key, "Resolved")
                    )
            pd.wait_for(2 * incidents, timeout=seconds + 600)
            wait_until(lambda: drained(store), timeout=60)
            last = max(r["at"] for r in pd.requests)
            gateway.stop()
    finally:
        pd.stop()
    sent = [(e["event_action"], e["dedup_key"]) for e in pd.events]
    twice = len(sent) - len(set(sent))
    in_order = all(sent.index(("trigger", k)) < sent.index(("resolve", k)) for k in keys)
    return (
        f"PagerDuty down {seconds:.0f} s ({2 * incidents} events queued, {len(pd.requests) - len(sent)}"
        f" attempts answered 503): delivered {len(set(sent))} of {2 * incidents}, twice {twice},"
        f" each resolve after its trigger: {in_order}; the last {last - pd.up_at:.0f} s after"
        " PagerDuty was back"
    )


class _stand_in:
    """A started PagerDuty stand-in, stopped at the end of the block."""

    def __enter__(self) -> PagerDutyStandIn:
        self.pd = PagerDutyStandIn().start()
        return self.pd

    def __exit__(self, *exc: object) -> None:
        self.pd.stop()


SCENARIOS = {"kill": kill_worker, "disk": disk_full, "pagerduty": pagerduty_down}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    names = parser.parse_args().scenario or list(SCENARIOS)
    if unknown := set(names) - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    for name in names:
        started = time.monotonic()
        print(f"{SCENARIOS[name]()}  [{time.monotonic() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    threading.excepthook = lambda args: None  # the stand-in's broken pipes after a kill
    main()
