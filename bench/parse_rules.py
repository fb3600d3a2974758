"""Parse + rules throughput on one core, against the bare aiosmtpd listener in the same run.

    python bench/parse_rules.py [--seconds 3] [--no-smtp]

Messages are Desk.com-style HTML notifications of about 3 KB and 60 KB; the ruleset has 20 rules
and the matching one is the 19th of 20. Goal: >= 3,000 msg/s for 3 KB, so that
parsing and rules never limit the SMTP listener (ratio to the bare aiosmtpd rate > 1).

The "pack + filter" case (issue 15) runs 3 KB Zendesk HTML notifications through
parsing_rules/zendesk.toml behind a two-condition sender [filter] and a `time within` schedule
[filter] (a round-the-clock schedule, so every mail passes); every mail matches the pack's third
rule. Rates are given per wall second and per CPU second of this
process (the CPU figure is the one to trust on a shared box).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BareSmtpd, smtp_source
from gateway.mail.parse import parse_message
from gateway.rules import evaluate, load_ruleset
from gateway.schedules import Schedule, parse_hours

ROOT = Path(__file__).resolve().parent.parent
PACK_FILTER = """
[filter]
mode = "all"
conditions = [
  { field = "from", op = "contains", value = "@acme.zendesk.com", ignore_case = true },
  { field = "subject", op = "not_contains", value = "[TEST]" },
]
"""

ROW = (
    '<tr><td style="padding:4px;font-family:Arial,sans-serif;color:#333">{label}</td>'
    '<td style="padding:4px;font-family:Arial,sans-serif">{value}</td></tr>\n'
)


def notification(target_bytes: int, n: int) -> bytes:
    rows = [ROW.format(label="Case", value=f"#{n}"), ROW.format(label="Status:", value="New")]
    filler = "Customer reports the printer on floor 2 is on fire again; please advise. "
    i = 0
    while sum(len(r) for r in rows) < target_bytes - 550:
        rows.append(ROW.format(label=f"Note {i}", value=filler))
        i += 1
    html = (
        "<html><head><style>td{border:1px solid #ccc}</style></head><body>"
        f"<p>Hello team,</p><table>{''.join(rows)}</table>"
        "<p>Status: New</p><p>-- Desk.com</p></body></html>"
    )
    headers = (
        "From: Desk.com <support@yourcompany.desk.com>\r\nTo: desk@gateway.example\r\n"
        f"Subject: Printer on fire in building {n}\r\nMessage-ID: <case-{n}@desk.example>\r\n"
        "Date: Tue, 24 Nov 2026 04:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return headers.encode() + html.encode()


def ruleset_file(directory: Path) -> Path:
    """17 non-matching rules of mixed operators, then the 3 default Desk.com rules."""
    rules = []
    for i in range(17):
        op, value = [
            ("contains", f"Status: Escalated-{i}"),
            ("matches", rf"(?i)ticket\s+#{i}\d{{6}}\b"),
            ("starts_with", f"[ALERT-{i}]"),
        ][i % 3]
        field = "subject" if op == "starts_with" else "body"
        rules.append(
            f'[[rule]]\nname = "rule {i}"\nconditions = [ {{ field = "{field}", op = "{op}", '
            f"value = '{value}', ignore_case = {str(i % 2 == 0).lower()} }} ]\n"
            'action = "trigger"\n'
        )
    default = (
        Path(__file__).resolve().parent.parent / "parsing_rules" / "helpdesk.toml"
    ).read_text()
    path = directory / "bench.toml"
    path.write_text("\n".join(rules) + "\n" + default)
    return path


def zendesk_notification(target_bytes: int, n: int) -> bytes:
    """A Zendesk trigger mail as the pack's template renders it, HTML-only, padded with the
    ticket's conversation to about `target_bytes`."""
    ticket = 4000 + n
    lines = [
        f"<p>Ticket #{ticket}: Checkout returns 502 for EU customers</p>",
        "<div>Status: Open</div>",
        "<div>Priority: High</div>",
        "<div>Requester: Jane Customer</div>",
        "<div>Assignee: Sam Agent</div>",
        f"<div>Link: https://acme.zendesk.com/agent/tickets/{ticket}</div>",
    ]
    filler = "Customer reports every checkout in the EU shop fails with a 502 since 09:12. "
    while sum(map(len, lines)) < target_bytes - 600:
        lines.append(f'<p style="font-family:Arial,sans-serif;color:#333">{filler}</p>')
    html = f"<html><body><table><tr><td>{''.join(lines)}</td></tr></table></body></html>"
    headers = (
        "From: Acme Support <support@acme.zendesk.com>\r\nTo: zendesk@gateway.example\r\n"
        f"Subject: [Zendesk] Checkout returns 502 for EU customers (#{ticket})\r\n"
        f"Message-ID: <ticket-{ticket}@acme.zendesk.com>\r\n"
        "Date: Tue, 24 Nov 2026 04:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return headers.encode() + html.encode()


SCHEDULE = Schedule(  # open around the clock, so every mail passes and the rates compare
    "support-hours",
    "Europe/Berlin",
    weekly=((parse_hours("00:00-24:00"),),) * 7,
)
SCHEDULE_FILTER = """
[filter]
mode = "all"
conditions = [{ field = "time", op = "within", value = "support-hours" }]
"""


def pack_ruleset_files(directory: Path) -> list[Path]:
    """The Zendesk pack, a [filter] on the sender and a second one on a schedule."""
    sender = directory / "filter.toml"
    sender.write_text(PACK_FILTER)
    hours = directory / "hours.toml"
    hours.write_text(SCHEDULE_FILTER)
    return [ROOT / "parsing_rules" / "zendesk.toml", sender, hours]


def measure(
    messages: list[bytes], ruleset, seconds: float, rule: str | None = None
) -> tuple[float, float]:
    """(per wall second, per CPU second) of parse_message + evaluate, on this one thread."""
    count = 0
    started, cpu = time.perf_counter(), time.process_time()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for raw in messages:
            decision = evaluate(ruleset, parse_message(raw))
            assert decision.action == "trigger", decision.reason
            assert rule is None or decision.rule == rule, decision.reason
        count += len(messages)
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return count / wall, count / used


def pack_case(seconds: float) -> None:
    """Issue 15: a helpdesk pack behind a sender [filter] and a `time` (schedule) [filter]."""
    with tempfile.TemporaryDirectory() as tmp:
        ruleset = load_ruleset(pack_ruleset_files(Path(tmp)), schedules={"support-hours": SCHEDULE})
    messages = [zendesk_notification(3 * 1024, n) for n in range(50)]
    real = sum(map(len, messages)) / len(messages)
    wall, per_cpu = measure(messages, ruleset, seconds, rule="zendesk new or open")
    print(
        f"zendesk pack + [filter] + schedule, 3 KB HTML ({real / 1024:.1f} KB): "
        f"{wall:8.0f} msg/s, {per_cpu:8.0f} msg/CPU-s  (goal >= 3000)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-smtp", action="store_true", help="skip the bare aiosmtpd baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ruleset = load_ruleset([ruleset_file(Path(tmp))])
    print(
        f"ruleset: {len(ruleset.rules)} rules; the matching one is rule 19 (only a disabled one after it)"
    )
    rates = {}
    for label, size in (("3 KB", 3 * 1024), ("60 KB", 60 * 1024)):
        messages = [notification(size, n) for n in range(50)]
        real = sum(map(len, messages)) / len(messages)
        rates[label], per_cpu = measure(messages, ruleset, args.seconds)
        print(
            f"parse+rules {label:>5} HTML ({real / 1024:.1f} KB): {rates[label]:8.0f} msg/s, "
            f"{per_cpu:8.0f} msg/CPU-s  (goal 3 KB: >= 3000)"
        )
    pack_case(args.seconds)
    if args.no_smtp:
        return
    with BareSmtpd() as bare:
        smtp_source(bare.port, messages=2000, persistent=True)  # warm-up
        baseline = smtp_source(bare.port, messages=10000, sessions=16, persistent=True).rate
    print(f"bare aiosmtpd, 16 persistent sessions, 3 KB: {baseline:8.0f} msg/s")
    print(
        f"ratio parse+rules(3 KB) / bare listener: {rates['3 KB'] / baseline:.2f}  (> 1: rules never limit the listener)"
    )


if __name__ == "__main__":
    main()
