"""An alert storm against a throttling PagerDuty, then one new case.

    python bench/storm.py [--messages 1504] [--cases 50] [--timeout 420] [--rate-limit 300|default]

`gateway serve` (shipped settings, `[pagerduty] rate_limit_per_minute = 300`) delivers to
`bench/pd_sink.py --rate 5`: it accepts 5 events in any one-second window and
answers 429 beyond. The storm is 1,504 "Status: New" mails over 50 cases in a shuffled order,
sent over 16 persistent sessions; right after its last mail was accepted, one new case follows.
The run lasts until every event is delivered (or --timeout) and prints, next to the goals:

  events offered per case   every POST, 202 or 429, over the cases         goal <= 2
  429 answers                                                              goal <= 5
  every case paged          from the storm's first mail to the last case's
                            first accepted trigger                         goal <= 30 s
  late case paged           from its end of DATA to its accepted trigger   goal <= 2 s
  nothing lost              from the gateway's store: every mail accepted and decided, and
                            each case's incident counts all of its mails

It also prints how many repeats the gateway coalesced (absorbed on their incidents) and how
long the whole run took. `--rate-limit default` runs the gateway's own default (120 a minute
per routing key).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import send_python
from bench.common import GatewayServer, verdict, wait_until
from bench.pd_sink import PdSink, Request
from bench.workload import Mail, render, single_new, storm

ENDPOINT_RATE = 5.0


def rate_limit(value: str) -> int | None:
    """An int for `[pagerduty] rate_limit_per_minute`, or "default": leave it to the gateway."""
    return None if value == "default" else int(value)


def wait_ready(gateway: GatewayServer) -> None:
    """The worker is up once a mail no rule matches is decided (it sends nothing)."""
    gateway.store  # noqa: B018 - the benchmark's read connection, opened before the storm
    probe = render("storm readiness probe", "Informational", 0, "probe")
    send_python(gateway.port, [probe], sessions=1)
    if not wait_until(lambda: gateway.totals().get("decisions", 0) >= 1, 60):
        raise SystemExit("the gateway's worker did not decide the readiness probe within 60 s")


def first_paged(requests: list[Request]) -> dict[str, float]:
    """Per dedup_key: when its first trigger was accepted (202)."""
    paged: dict[str, float] = {}
    for r in sorted(requests, key=lambda r: r.at):
        if r.status == 202 and r.action == "trigger":
            paged.setdefault(r.key, r.at)
    return paged


def nothing_lost(gateway: GatewayServer, mails: list[Mail]) -> tuple[bool, str]:
    """Every mail accepted and decided, and every case's incident counts all of its mails."""
    totals = gateway.totals()
    expected = len(mails) + 1  # and the readiness probe
    accepted, decided = int(totals.get("accepted", 0)), int(totals.get("decisions", 0))
    per_case: dict[str, int] = {}
    for mail in mails:
        per_case[mail.subject] = per_case.get(mail.subject, 0) + 1
    incidents = {i.incident_key: i for i in gateway.store.incidents(limit=len(per_case) + 10)}
    short = [k for k, n in per_case.items() if k not in incidents or incidents[k].trigger_count < n]
    ok = (
        accepted == expected
        and decided == expected
        and gateway.gauge("jobs_pending") == 0
        and not short
    )
    detail = (
        f"{accepted}/{expected} accepted, {decided}/{expected} decided,"
        f" {len(per_case) - len(short)}/{len(per_case)} incidents count all their mails"
    )
    return ok, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1504, help="mails in the storm")
    parser.add_argument("--cases", type=int, default=50, help="cases the storm is about")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent SMTP sessions")
    parser.add_argument("--timeout", type=float, default=420, help="seconds to wait, at most")
    parser.add_argument(
        "--rate-limit",
        type=rate_limit,
        default=300,
        help="the gateway's rate_limit_per_minute, or 'default' (default: 300, as in the issue)",
    )
    parser.add_argument(
        "--endpoint-rate", type=float, default=ENDPOINT_RATE, help="events/s the endpoint accepts"
    )
    args = parser.parse_args()
    cases = min(args.cases, args.messages)
    mails = storm(args.messages, cases, "storm")
    late = single_new("late")
    with (
        PdSink(rate=args.endpoint_rate) as sink,
        GatewayServer(sink.url, rate_limit_per_minute=args.rate_limit) as gateway,
    ):
        wait_ready(gateway)
        print(
            f"storm: {len(mails)} 'Status: New' mails over {cases} cases, {args.sessions} sessions;"
            f" endpoint accepts {args.endpoint_rate:g} events/s, gateway"
            f" rate_limit_per_minute = {'default' if args.rate_limit is None else args.rate_limit}"
        )
        sent = send_python(gateway.port, [m.raw for m in mails], sessions=args.sessions)
        late_sent = send_python(gateway.port, [late.raw], sessions=1).sent_at[0]
        print(f"  storm accepted in {sent.seconds:.1f} s ({sent.rate:.0f} msg/s)")
        keys = {m.subject for m in mails}

        def finished() -> bool:
            paged = first_paged(sink.requests())
            return keys <= paged.keys() and late.subject in paged and gateway.backlog() == 0

        drained = wait_until(finished, args.timeout - (time.time() - sent.started), 0.5)
        requests = [r for r in sink.requests() if r.at >= sent.started]
        lost_ok, lost_detail = nothing_lost(gateway, [*mails, late])
        absorbed = sum(i.coalesced for i in gateway.store.incidents(limit=cases + 10))
        whole = time.time() - sent.started
    report(args, sent.started, late_sent, keys, late.subject, requests, drained)
    print(f"  nothing lost: every mail decided and visible: {verdict(lost_ok)} ({lost_detail})")
    print(f"  repeats coalesced on their incidents: {absorbed}; whole run {whole:.1f} s")


def report(
    args: argparse.Namespace,
    started: float,
    late_sent: float,
    keys: set[str],
    late_key: str,
    requests: list[Request],
    drained: bool,
) -> None:
    if not drained:
        print(
            f"  CUT at the {args.timeout:.0f} s timeout: events still pending, counts are lower bounds"
        )
    offered = len(requests) / (len(keys) + 1)
    throttled = sum(r.status == 429 for r in requests)
    paged = first_paged(requests)
    print(
        f"  events offered per case: {offered:.1f} ({len(requests)} POSTs for {len(keys) + 1}"
        f" cases)   (goal <= 2: {verdict(offered <= 2)})"
    )
    print(f"  429 answers: {throttled}   (goal <= 5: {verdict(throttled <= 5)})")
    if keys <= paged.keys():
        every = max(paged[k] for k in keys) - started
        print(f"  every case paged after {every:.1f} s   (goal <= 30 s: {verdict(every <= 30)})")
    else:
        print(f"  every case paged: NOT within the run ({len(keys & paged.keys())}/{len(keys)})")
    if late_key in paged:
        wait = paged[late_key] - late_sent
        print(f"  late new case paged after {wait:.1f} s   (goal <= 2 s: {verdict(wait <= 2)})")
    else:
        print("  late new case paged: NOT within the run")


if __name__ == "__main__":
    main()
