"""Load generator for the crash test: sends N Desk.com mails like an MTA would.

    python tests/crash_sender.py PORT COUNT OUTFILE [CASES]

Each mail has a unique Message-ID and, unless CASES is given, a unique subject; with CASES it
is an alert storm: mail n is about "Crash case {n % CASES}". A mail that got no 250 (connection refused or
dropped because the gateway was killed) is retried, with the same bytes, until it gets one. Every
250 is appended to OUTFILE as soon as it arrives, so the test knows what was acknowledged.
"""

from __future__ import annotations

import contextlib
import smtplib
import sys
import threading
import time
from email.message import EmailMessage

THREADS = 4
DEADLINE_SECONDS = 240


CASES: int | None = None


def message(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "support@helpdesk.example"
    msg["To"] = "desk@gateway.example"
    msg["Subject"] = f"Crash case {n if CASES is None else n % CASES}"
    msg["Message-ID"] = f"<crash-{n}@helpdesk.example>"
    msg.set_content(f"Case #{n}\nStatus: New\n" + "x" * 2000 + "\n")
    return msg.as_bytes()


def send_all(port: int, numbers: list[int], out, lock: threading.Lock, deadline: float) -> None:
    pending = list(numbers)
    client: smtplib.SMTP | None = None
    while pending and time.monotonic() < deadline:
        n = pending[0]
        try:
            if client is None:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
            client.sendmail("support@helpdesk.example", ["desk@gateway.example"], message(n))
        except (OSError, smtplib.SMTPException):
            client = None  # killed or restarting: try again shortly, like an MTA's queue
            time.sleep(0.05)
            continue
        with lock:
            out.write(f"{n}\n")
            out.flush()
        pending.pop(0)
    if client is not None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.quit()


def main() -> None:
    global CASES
    port, count, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    CASES = int(sys.argv[4]) if len(sys.argv) > 4 else None
    deadline = time.monotonic() + DEADLINE_SECONDS
    lock = threading.Lock()
    with open(path, "a") as out:
        threads = [
            threading.Thread(
                target=send_all, args=(port, list(range(i, count, THREADS)), out, lock, deadline)
            )
            for i in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


if __name__ == "__main__":
    main()
