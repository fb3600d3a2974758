"""`gateway test-rules`: the decision for one email, with its trace; nothing is sent."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from gateway.cli.common import EX_OK, add_command, read_input, reading_config
from gateway.config import DEFAULT_INSTALLATION_ID, LOOP_GUARD_MODES
from gateway.display import json_line, printable
from gateway.errors import GatewayError
from gateway.mail.loop_guard import LoopVerdict, loop_verdict
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
        "--loop-guard",
        choices=LOOP_GUARD_MODES,
        help="judge automatic mail as this loop_guard setting would"
        " (default: the service's; strict with --rules alone)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the decision as one JSON object (one line)"
    )


def run(args: argparse.Namespace) -> int:
    raw = read_input(args.file)
    mode, installation_id = args.loop_guard or "strict", DEFAULT_INSTALLATION_ID
    if args.rules:
        ruleset = load_ruleset(args.rules)
        timeout = 0.5
    else:
        settings = reading_config(args)  # rules only: no secrets needed
        service = settings.service(args.service or settings.services[0].name)
        ruleset = load_ruleset(list(service.rules))
        timeout = settings.gateway.regex_timeout_seconds
        mode = args.loop_guard or service.loop_guard
        installation_id = settings.gateway.installation_id
    mail = parse_message(raw)
    loop = loop_verdict(mail, mode=mode, installation_id=installation_id)
    try:
        decision = evaluate(ruleset, mail, regex_timeout=timeout)
    except GatewayError as exc:
        if args.json:
            print(json_line({**_mail_fields(mail, loop), "quarantined": str(exc)}))
        else:
            print(f"quarantined: {printable(exc)}")
        return EX_OK
    if args.json:
        print(json_line({**_mail_fields(mail, loop), **asdict(decision)}))
    else:
        _print_decision(mail, loop, decision)
    return EX_OK


def _mail_fields(mail: ParsedMail, loop: LoopVerdict) -> dict[str, object]:
    """What `--json` says about the mail itself, ahead of the decision's fields.

    `loop_guard`: the signal the loop guard ignores the mail for (null when it acts on it);
    `loop_guard_decision`: what it found and what decided, also when it let the mail through.
    """
    return {
        "subject": mail.subject,
        "from": mail.from_,
        "loop_guard": loop.signal if loop.ignored else None,
        "loop_guard_decision": loop.describe() or None,
        "loop_guard_setting": loop.setting or None,
    }


def _print_decision(mail: ParsedMail, loop: LoopVerdict, decision: Decision) -> None:
    if loop.ignored:
        print(f"note:     the loop guard would ignore this mail: {printable(loop.describe())}")
    elif loop.signal:
        print(f"note:     the loop guard lets this mail through: {printable(loop.describe())}")
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
