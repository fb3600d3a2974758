"""SMTP throughput of the full gateway on mail that matches its rules, against bare aiosmtpd.

    python bench/smtp_throughput.py [--messages 3000] [--sessions 16] [--no-memory]

Every mail matches the shipped `parsing_rules/helpdesk.toml` (bench/workload.py: about 55 % new
cases, 25 % repeats of open cases, 20 % resolves), so each is incident and outbox work.
`gateway serve` runs with the shipped settings (log level info) and delivers to
`bench/pd_sink.py`, a minimal Events API endpoint in its own process. For each client:

  * Python client (asyncio), 16 persistent sessions; and one connection per mail;
  * Postfix's smtp-source (C), one connection per mail (one run per mail: see bench/clients.py)

it prints intake msg/s of a bare aiosmtpd handler and of the gateway with intake pacing off
(`[smtp] in_flow_backlog = 0`: what the listener itself takes) in the same run, their ratio
(goal >= 0.8), the gateway's END-TO-END delivered/s (first mail sent -> last event at the
PagerDuty endpoint, goal >= 0.9x its intake) with pacing off and with the shipped settings
(paced), and the CPU per mail of the gateway's process tree (shipped settings) and of the
client. Then the peak RSS of each server while 16 clients send 5 MB mails.
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import threading
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import send_python, send_smtp_source
from bench.common import BareSmtpd, GatewayServer, verdict
from bench.measure import Run, Sender, run_load, warm_up
from bench.pd_sink import PdSink
from bench.workload import mixed, summary

CLIENTS = {
    "python-persistent": lambda port, s: partial(send_python, port, sessions=s),
    "python-per-connection": lambda port, s: partial(
        send_python, port, sessions=s, persistent=False
    ),
    "smtp-source-per-connection": lambda port, s: partial(send_smtp_source, port, sessions=s),
}


def bare_rate(client: str, messages: int, sessions: int) -> tuple[float, float]:
    """(msg/s, client CPU ms per mail) of the bare listener, after a warm-up."""
    with BareSmtpd() as bare:
        sender: Sender = CLIENTS[client](bare.port, sessions)
        sender([m.raw for m in mixed(min(200, messages), "bare-warm-up")])
        result = sender([m.raw for m in mixed(messages, "bare")])
    return result.rate, result.client_cpu / messages * 1000


def gateway_run(client: str, args: argparse.Namespace, *, paced: bool) -> Run:
    """One run of the full gateway: shipped settings (`paced`), or with intake pacing off, so
    intake shows what the listener itself takes."""
    mails = mixed(args.messages, "run")
    smtp_extra = "" if paced else "in_flow_backlog = 0"
    with (
        PdSink() as sink,
        GatewayServer(sink.url, log_level=args.log_level, smtp_extra=smtp_extra) as gateway,
    ):
        warm_up(gateway)
        sender = CLIENTS[client](gateway.port, args.sessions)
        return run_load(gateway, sink, mails, sender, args.timeout)


def gateway_row(client: str, args: argparse.Namespace) -> None:
    bare, bare_client_cpu = bare_rate(client, args.messages, args.sessions)
    unpaced = gateway_run(client, args, paced=False)
    paced = gateway_run(client, args, paced=True)
    capacity = unpaced.sent.rate
    print(f"{client}:")
    print(
        f"  intake     bare {bare:6.0f} msg/s   gateway, pacing off {capacity:6.0f} msg/s"
        f"   ratio {capacity / bare:.2f}   (goal >= 0.8: {verdict(capacity / bare >= 0.8)})"
    )
    for run, name in ((unpaced, "pacing off"), (paced, "shipped (paced)")):
        delivered_row(run, name, args.timeout)
    print(
        f"  CPU/mail   gateway {paced.cpu_ms_per_mail():.2f} ms"
        f" (listener {paced.cpu_ms_per_mail('root'):.2f},"
        f" worker {paced.cpu_ms_per_mail('children'):.2f})"
        f"   client {paced.sent.client_cpu / len(paced.mails) * 1000:.2f} ms"
        f" (bare run {bare_client_cpu:.2f} ms)"
    )


def delivered_row(run: Run, name: str, timeout: float) -> None:
    intake, delivered = run.sent.rate, run.delivered_rate
    if delivered is None:
        print(f"  delivered  {name}: NOT DONE, backlog left after {timeout:.0f} s")
        return
    ratio = delivered / intake
    print(
        f"  delivered  {name}: {delivered:6.0f} msg/s end to end ({len(run.requests)} events),"
        f" intake {intake:.0f} msg/s, {ratio:.2f}x   (goal >= 0.9x: {verdict(ratio >= 0.9)})"
    )


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (the gateway's worker is a child)."""
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


def memory(log_level: str) -> None:
    with BareSmtpd() as bare:
        base = peak_rss_mb(bare.proc.pid)
        big_messages(bare.port)
        bare_peak = peak_rss_mb(bare.proc.pid)
    with PdSink() as sink, GatewayServer(sink.url, log_level=log_level) as gateway:
        warm_up(gateway, 20)  # the worker child is up and has imported everything
        start_rss = peak_rss_mb(gateway.proc.pid)
        big_messages(gateway.port)
        gateway_peak = peak_rss_mb(gateway.proc.pid)
    print(
        f"peak RSS, 16 clients x 5 MB: bare {bare_peak:.0f} MB (idle {base:.0f} MB),"
        f" gateway {gateway_peak:.0f} MB (idle {start_rss:.0f} MB, worker child included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="mails per measurement")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent SMTP sessions")
    parser.add_argument("--log-level", default="info", help="gateway log level (shipped: info)")
    parser.add_argument("--client", choices=sorted(CLIENTS), action="append", help="only these")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for delivery")
    parser.add_argument("--no-memory", action="store_true", help="skip the 5 MB RSS run")
    args = parser.parse_args()
    print(f"{summary(mixed(args.messages, 'run'))}, {args.sessions} sessions, ~3 KB each")
    for client in args.client or CLIENTS:
        gateway_row(client, args)
    if not args.no_memory:
        memory(args.log_level)


if __name__ == "__main__":
    main()
