"""The mail the benchmarks send: Desk.com notifications that match the shipped rules.

`parsing_rules/helpdesk.toml` triggers on "Status: New" and resolves on "Status: Resolved",
both keyed by the subject. A benchmark mail is one of

    new      the first "Status: New" of a case: opens an incident (one trigger event)
    repeat   another "Status: New" for a case that is still open (PagerDuty dedups it; a
             gateway may coalesce it)
    resolve  "Status: Resolved" for an open case: resolves the incident (one resolve event)

so every mail is incident and outbox work, none is "unmatched". Each mail has its own
Message-ID: byte-identical copies would rightly be recorded as duplicates and never decided.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate

SENDER = "support@yourcompany.desk.com"
RECIPIENT = "desk@gateway.example"
TARGET_BYTES = 3072  # about the size of a real helpdesk notification

_FILLER = (
    "Customer wrote: the printer on floor 2 shows error E-42 again and the queue is stuck.",
    "Agent note: restarted the spooler service, asked the customer to retry the print job.",
    "Customer wrote: still failing, now the whole department cannot print invoices today.",
    "Agent note: escalated to second level, hardware vendor ticket to follow if needed.",
)


@dataclass(frozen=True)
class Mail:
    """One benchmark mail: its role in the case's life and its bytes (CRLF line endings)."""

    kind: str  # "new" | "repeat" | "resolve"
    subject: str  # also the incident key: plain ASCII, single spaces, nothing to normalise
    raw: bytes

    @property
    def event(self) -> tuple[str, str] | None:
        """The (event_action, dedup_key) only this mail causes; None for a repeat, whose
        trigger (if a gateway sends one) shares its key with the case's first."""
        if self.kind == "repeat":
            return None
        return ("resolve" if self.kind == "resolve" else "trigger", self.subject)


def render(subject: str, status: str, case: int, message_id: str) -> bytes:
    """A Desk.com-style plain-text notification of about TARGET_BYTES."""
    head = (
        f"From: Desk.com <{SENDER}>\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}@helpdesk.example>\r\nDate: {formatdate()}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    body = (
        f"Case #{case} has been updated.\r\n\r\nStatus: {status}\r\nPriority: 5\r\n"
        "Requester: Jane Customer <jane@customer.example>\r\n\r\n"
    )
    lines, i = [], 0
    while len(head) + len(body) + sum(len(line) + 2 for line in lines) < TARGET_BYTES:
        lines.append(_FILLER[i % len(_FILLER)])
        i += 1
    return (head + body + "\r\n".join(lines) + "\r\n").encode()


def _mail(kind: str, prefix: str, case: int, serial: int) -> Mail:
    subject = f"{prefix} printer on fire case {case}"
    status = "Resolved" if kind == "resolve" else "New"
    return Mail(kind, subject, render(subject, status, case, f"{prefix}.{serial}"))


def mixed(count: int, prefix: str, *, seed: int = 1, gap: int = 50) -> list[Mail]:
    """`count` mails: about 55 % new cases, 25 % repeats and 20 % resolves of open cases.

    A repeat or resolve comes at least `gap` mails after its case's first mail, so even over
    many concurrent sessions the case's trigger is decided first (the first event of a key then
    belongs to its first mail, which is what latency is measured on). `prefix` keeps the
    subjects of different runs apart. Deterministic for a seed.
    """
    rng = random.Random(seed)
    young: deque[tuple[int, int]] = deque()  # (position opened, case), oldest first
    mature: list[int] = []  # open cases old enough to be repeated or resolved
    mails: list[Mail] = []
    cases = 0
    for n in range(count):
        while young and n - young[0][0] >= gap:
            mature.append(young.popleft()[1])
        roll = rng.random()
        if mature and roll < 0.20:
            index = rng.randrange(len(mature))
            mature[index], mature[-1] = mature[-1], mature[index]
            mails.append(_mail("resolve", prefix, mature.pop(), n))
        elif mature and roll < 0.45:
            mails.append(_mail("repeat", prefix, rng.choice(mature), n))
        else:
            cases += 1
            young.append((n, cases))
            mails.append(_mail("new", prefix, cases, n))
    return mails


def storm(count: int, cases: int, prefix: str, *, seed: int = 1) -> list[Mail]:
    """`count` "Status: New" mails over `cases` cases in a shuffled order: every case's first
    mail is "new", the rest are repeats (a monitoring system mailing the helpdesk in a loop)."""
    rng = random.Random(seed)
    order = [n % cases + 1 for n in range(count)]
    rng.shuffle(order)
    seen: set[int] = set()
    mails = []
    for serial, case in enumerate(order):
        mails.append(_mail("repeat" if case in seen else "new", prefix, case, serial))
        seen.add(case)
    return mails


def single_new(prefix: str) -> Mail:
    return _mail("new", prefix, 1, 0)


def summary(mails: list[Mail]) -> str:
    """'3000 mails: 1650 new, 750 repeats, 600 resolves'."""
    counts = {kind: sum(m.kind == kind for m in mails) for kind in ("new", "repeat", "resolve")}
    return (
        f"{len(mails)} mails: {counts['new']} new cases, {counts['repeat']} repeats,"
        f" {counts['resolve']} resolves"
    )
