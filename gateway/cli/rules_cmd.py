"""`gateway test-rules`: the decision for one email, with its trace; nothing is sent."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from gateway.cli.common import EX_OK, add_command, read_input, reading_config
from gateway.config import find_config_path
from gateway.display import json_line, printable
from gateway.errors import GatewayError
from gateway.mail.parse import ParsedMail, parse_message
from gateway.rules import Decision, evaluate, load_ruleset


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "test-rules",
        run,
        "show the decision for one email without sending anything",
        "gateway test-rules tests/fixtures/desk_new.eml",
    )
    p.add_argument("file", help="an .eml file, or - for standard input")
    p.add_argument("--service", help="service whose rules to use (default: the first)")
    p.add_argument("--rules", nargs="+", type=Path, help="rule files to use instead of a service's")
    p.add_argument(
        "--json", action="store_true", help="print the decision as one JSON object (one line)"
    )
    p.add_argument(
        "--at",
        type=_instant,
        help="judge time conditions at this ISO time (e.g. 2026-12-24T10:00+01:00); default now",
    )


def _instant(text: str) -> float:
    """An ISO 8601 date-time with an offset -> Unix time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date-time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. +01:00 or Z")
    return value.timestamp()


def run(args: argparse.Namespace) -> int:
    raw = read_input(args.file)
    if args.rules:  # the config, where there is one, still supplies the schedules
        path = find_config_path(args.config)
        schedules = reading_config(args).schedules if path.is_file() else {}
        ruleset = load_ruleset(args.rules, schedules=schedules)
        timeout = 0.5
    else:
        settings = reading_config(args)  # rules only: no secrets needed
        name = args.service or settings.services[0].name
        ruleset = load_ruleset(list(settings.service(name).rules), schedules=settings.schedules)
        timeout = settings.gateway.regex_timeout_seconds
    mail = parse_message(raw)
    try:
        decision = evaluate(ruleset, mail, regex_timeout=timeout, at=args.at)
    except GatewayError as exc:
        if args.json:
            print(json_line({**_mail_fields(mail), "quarantined": str(exc)}))
        else:
            print(f"quarantined: {printable(exc)}")
        return EX_OK
    if args.json:
        print(json_line({**_mail_fields(mail), **asdict(decision)}))
    else:
        _print_decision(mail, decision)
    return EX_OK


def _mail_fields(mail: ParsedMail) -> dict[str, object]:
    """What `--json` says about the mail itself, ahead of the decision's fields."""
    loop = mail.loop_reason if mail.is_auto_reply or mail.is_bounce else None
    return {"subject": mail.subject, "from": mail.from_, "loop_guard": loop}


def _print_decision(mail: ParsedMail, decision: Decision) -> None:
    if mail.is_auto_reply or mail.is_bounce:
        print(f"note:     the loop guard would ignore this mail ({printable(mail.loop_reason)})")
    lines = [
        ("subject", mail.subject),
        ("rule", decision.rule or "(none)"),
        ("action", decision.action),
        ("key", decision.incident_key or "-"),
        ("summary", decision.summary or "-"),
        ("severity", decision.severity or "-"),
        ("reason", decision.reason),
    ]
    for label, value in lines:
        print(f"{label + ':':<9} {printable(value)}")
    for name, value in decision.details.items():
        print(f"detail:   {printable(name)} = {printable(value)}")
    for link in decision.links:
        print(f"link:     {printable(link.get('text', ''))} {printable(link.get('href', ''))}")
    print("trace:")
    for step in decision.trace:
        print(f"  {'✔' if step.matched else '✘'} {printable(step.rule)}: {printable(step.reason)}")
