"""SMTP throughput, latency and memory: the full gateway against a bare aiosmtpd handler.

    python bench/smtp_throughput.py [--messages 6000] [--quick]

In one run, with Postfix's smtp-source (16 concurrent sessions, 3 KB messages):
  * msg/s for (a) a bare aiosmtpd handler that does nothing and (b) `gateway serve` with the
    durable spool, rules, incident mirror and PagerDuty outbox (delivering every event to
    `bench/pd_sink.py`, a minimal Events API endpoint in its own process, so the harness costs
    the measured cores little), one message per connection and persistent connections; prints
    gateway/bare (goal >= 0.8);
  * end-of-DATA -> PagerDuty POST latency p50/p99 at a steady 100 msg/s (goal p99 < 50 ms);
  * peak RSS of each server while 16 clients send 5 MB messages.
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, BareSmtpd, smtp_source, wait_for_port
from tests.net import free_port
from tests.pdserver import PagerDutyStandIn

ROUTING_KEY = "B0123456789abcdef0123456789abcde"


class GatewayServer:
    """`gateway serve` as a child process with a config in a temp dir."""

    def __init__(self, pd_url: str, log_level: str = "warning") -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.port = free_port()
        config = Path(self.tmp.name) / "config.toml"
        config.write_text(
            f"""
[gateway]
data_dir = "data"
rules_dir = "{(ROOT / "parsing_rules").as_posix()}"
log_level = "{log_level}"
log_format = "json"
[smtp]
listen = ["127.0.0.1:{self.port}"]
max_message_bytes = 20971520
max_connections = 200
[pagerduty]
events_url = "{pd_url}"
[[service]]
name = "helpdesk"
addresses = ["desk@*"]
rules = ["helpdesk.toml"]
routing_key = "{ROUTING_KEY}"
"""
        )
        self.config = config

    def __enter__(self) -> GatewayServer:
        with open(Path(self.tmp.name) / "log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
            )
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.tmp.cleanup()


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (the gateway's processor is a child)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def throughput(port: int, messages: int, persistent: bool, sessions: int = 16) -> float:
    smtp_source(port, messages=min(1000, messages // 5), persistent=persistent)  # warm-up
    return smtp_source(
        port, messages=messages, sessions=sessions, size=3072, persistent=persistent
    ).rate


def latency(port: int, pd: PagerDutyStandIn, count: int, rate: float = 100.0) -> list[float]:
    """Seconds from the end of DATA to the PagerDuty POST, at a steady `rate` msg/s."""
    sent: dict[str, float] = {}
    arrivals: dict[str, float] = {}
    lock = threading.Lock()
    original = pd._answer

    def recording(body: bytes):
        now = time.time()
        answer = original(body)
        import json

        with lock:
            arrivals[json.loads(body)["dedup_key"]] = now
        return answer

    pd._answer = recording  # type: ignore[method-assign]
    client = smtplib.SMTP("127.0.0.1", port)
    client.ehlo()
    start = time.monotonic()
    for n in range(count):
        subject = f"Latency probe {n} {time.time()}"
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = (
            "desk@helpdesk.example",
            "desk@gateway.example",
            subject,
        )
        msg.set_content("Case #29\nStatus: New\n" + "x" * 2800)
        client.mail("desk@helpdesk.example")
        client.rcpt("desk@gateway.example")
        sent[subject] = time.time()
        client.data(msg.as_bytes())
        time.sleep(max(0.0, start + (n + 1) / rate - time.monotonic()))
    client.quit()
    deadline = time.time() + 30
    while len(arrivals) < count and time.time() < deadline:
        time.sleep(0.05)
    pd._answer = original  # type: ignore[method-assign]
    return sorted(arrivals[s] - sent[s] for s in sent if s in arrivals)


def big_messages(port: int, clients: int = 16, size: int = 5 * 1024 * 1024) -> None:
    body = ("Status: New\r\n" + "y" * 998 + "\r\n") * (size // 1000)
    raw = f"From: a@b\r\nTo: desk@gateway.example\r\nSubject: big\r\n\r\n{body}".encode()

    def send(i: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            client.sendmail(
                "a@helpdesk.example",
                ["desk@gateway.example"],
                raw.replace(b"big", f"big {i}".encode()),
            )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--latency-count", type=int, default=1000)
    parser.add_argument("--log-level", default="info", help="gateway log level during the run")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent SMTP sessions")
    args = parser.parse_args()
    pd = PagerDutyStandIn().start()
    print(f"{args.sessions} sessions, 3 KB messages, {args.messages} messages per measurement")
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "pd_sink.py"), str(sink_port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        sink_url = f"http://127.0.0.1:{sink_port}/v2/enqueue"
        for mode, persistent in (
            ("one message per connection", False),
            ("persistent connections", True),
        ):
            with BareSmtpd() as bare:
                bare_rate = throughput(bare.port, args.messages, persistent, args.sessions)
            with GatewayServer(sink_url, args.log_level) as gateway:
                gateway_rate = throughput(gateway.port, args.messages, persistent, args.sessions)
            print(
                f"{mode:>28}: bare {bare_rate:7.0f} msg/s   gateway {gateway_rate:7.0f} msg/s"
                f"   ratio {gateway_rate / bare_rate:.2f}  (goal >= 0.8)"
            )
        with GatewayServer(pd.url, args.log_level) as gateway:
            latency(gateway.port, pd, 100)  # warm-up: first imports, connections, page cache
            lat = latency(gateway.port, pd, args.latency_count)
            print(
                f"end-of-DATA -> PagerDuty POST at 100 msg/s ({len(lat)}/{args.latency_count} delivered):"
                f" p50 {statistics.median(lat) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms,"
                f" max {lat[-1] * 1000:.1f} ms  (goal p99 < 50 ms)"
            )
        with BareSmtpd() as bare:
            base = peak_rss_mb(bare.proc.pid)
            big_messages(bare.port)
            bare_peak = peak_rss_mb(bare.proc.pid)
        with GatewayServer(pd.url, args.log_level) as gateway:
            time.sleep(1)
            start_rss = peak_rss_mb(gateway.proc.pid)
            big_messages(gateway.port)
            gateway_peak = peak_rss_mb(gateway.proc.pid)
        print(
            f"peak RSS, 16 clients x 5 MB: bare {bare_peak:.0f} MB (idle {base:.0f} MB),"
            f" gateway {gateway_peak:.0f} MB (idle {start_rss:.0f} MB, worker child included)"
        )
    finally:
        sink.terminate()
    pd.stop()


if __name__ == "__main__":
    main()
