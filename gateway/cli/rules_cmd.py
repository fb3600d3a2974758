"""`gateway test-rules`: the decision for one email, with its trace; nothing is sent."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from gateway.cli.common import EX_OK, add_command, config, read_input
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
    p.add_argument("--json", action="store_true", help="print the decision as JSON")


def run(args: argparse.Namespace) -> int:
    raw = read_input(args.file)
    if args.rules:
        ruleset = load_ruleset(args.rules)
        timeout = 0.5
    else:
        settings = config(args)
        name = args.service or settings.services[0].name
        ruleset = load_ruleset(list(settings.service(name).rules))
        timeout = settings.gateway.regex_timeout_seconds
    mail = parse_message(raw)
    try:
        decision = evaluate(ruleset, mail, regex_timeout=timeout)
    except GatewayError as exc:
        print(f"quarantined: {exc}")
        return EX_OK
    if args.json:
        print(json.dumps(asdict(decision), indent=2, ensure_ascii=False, default=str))
    else:
        _print_decision(mail, decision)
    return EX_OK


def _print_decision(mail: ParsedMail, decision: Decision) -> None:
    if mail.is_auto_reply or mail.is_bounce:
        print(f"note:     the loop guard would ignore this mail ({mail.loop_reason})")
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
        print(f"{label + ':':<9} {value}")
    for name, value in decision.details.items():
        print(f"detail:   {name} = {value}")
    for link in decision.links:
        print(f"link:     {link.get('text', '')} {link.get('href', '')}")
    print("trace:")
    for step in decision.trace:
        print(f"  {'✔' if step.matched else '✘'} {step.rule}: {step.reason}")
