"""SMTP throughput of the full gateway on mail that matches its rules, against bare aiosmtpd.

    python bench/smtp_throughput.py [--messages 3000] [--sessions 16] [--no-memory]

Every mail matches the shipped `parsing_rules/helpdesk.toml` (bench/workload.py: about 55 % new
cases, 25 % repeats of open cases, 20 % resolves), so each is incident and outbox work.
`gateway serve` runs with the shipped settings (log level info) and delivers to
`bench/pd_sink.py`, a minimal Events API endpoint in its own process. For each client:

  * Python client (asyncio), 16 persistent sessions; and one connection per mail;
  * Postfix's smtp-source (C), one connection per mail (one run per mail: see bench/clients.py)

it prints intake msg/s of a bare aiosmtpd handler and of the gateway in the same run, their
ratio (goal >= 0.8), the gateway's END-TO-END delivered/s (first mail sent -> last event at the
PagerDuty endpoint, goal >= 0.9x its intake) and the CPU per mail of the gateway's process tree
and of the client. Then the peak RSS of each server while 16 clients send 5 MB mails.
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
from bench.measure import Sender, run_load, warm_up
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


def gateway_row(client: str, args: argparse.Namespace) -> None:
    bare, bare_client_cpu = bare_rate(client, args.messages, args.sessions)
    mails = mixed(args.messages, "run")
    with PdSink() as sink, GatewayServer(sink.url, log_level=args.log_level) as gateway:
        warm_up(gateway)
        run = run_load(
            gateway, sink, mails, CLIENTS[client](gateway.port, args.sessions), args.timeout
        )
    intake = run.sent.rate
    delivered = run.delivered_rate
    print(f"{client}:")
    print(
        f"  intake     bare {bare:6.0f} msg/s   gateway {intake:6.0f} msg/s"
        f"   ratio {intake / bare:.2f}   (goal >= 0.8: {verdict(intake / bare >= 0.8)})"
    )
    if delivered is None:
        print(f"  delivered  NOT DONE: backlog left after {args.timeout:.0f} s")
    else:
        ratio = delivered / intake
        print(
            f"  delivered  {delivered:6.0f} msg/s end to end ({len(run.requests)} events)"
            f"   {ratio:.2f}x intake   (goal >= 0.9x: {verdict(ratio >= 0.9)})"
        )
    print(
        f"  CPU/mail   gateway {run.cpu_ms_per_mail():.2f} ms"
        f" (listener {run.cpu_ms_per_mail('root'):.2f}, worker {run.cpu_ms_per_mail('children'):.2f})"
        f"   client {run.sent.client_cpu / len(mails) * 1000:.2f} ms"
        f" (bare run {bare_client_cpu:.2f} ms)"
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
