"""`gateway test-rules`: the decision for one email, with its trace; nothing is sent."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from gateway.cli.common import EX_OK, UsageError, add_command, read_input, reading_config
from gateway.config import (
    DEFAULT_INSTALLATION_ID,
    LOOP_GUARD_MODES,
    AuthSettings,
    NotifySettings,
    find_config_path,
)
from gateway.decide.authenticity import AuthPreview, preview_authenticity, with_auth_fields
from gateway.decide.pagerduty_side import read_facts
from gateway.display import json_line, printable
from gateway.errors import GatewayError
from gateway.mail.authenticity import DnsTxtResolver
from gateway.mail.loop_guard import LoopVerdict, loop_verdict
from gateway.mail.parse import ParsedMail, parse_message
from gateway.rules import Decision, Ruleset, evaluate, evaluate_pagerduty, load_ruleset


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "test-rules",
        run,
        "show the decision for one email without sending anything",
        "gateway test-rules tests/fixtures/desk_new.eml",
    )
    p.add_argument("file", nargs="?", help="an .eml file, or - for standard input")
    p.add_argument(
        "--pagerduty-event",
        metavar="EVENT.json",
        help="a Webhooks v3 body (or -): what the [[pagerduty_rule]] reverse rules do with it",
    )
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
    p.add_argument(
        "--dns",
        action="store_true",
        help='require_authentication = "verify": check DKIM/DMARC with real DNS lookups',
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
    if args.pagerduty_event:
        return run_pagerduty_event(args)
    if not args.file:
        raise UsageError("test-rules needs FILE.eml (or -), or --pagerduty-event EVENT.json")
    raw = read_input(args.file)
    ruleset, timeout, _notify = _rules_of(args)
    mail = parse_message(raw)
    loop = loop_verdict(mail, **_loop_guard_of(args))
    auth = _auth_preview(args, raw)
    if auth is not None:
        mail = with_auth_fields(mail, auth.verdict)  # the rules' auth.* fields, as served
    shown = {**_mail_fields(mail, loop), "auth": auth.as_dict() if auth else None}
    try:
        decision = evaluate(ruleset, mail, regex_timeout=timeout, at=args.at)
    except GatewayError as exc:
        if args.json:
            print(json_line({**shown, "quarantined": str(exc)}))
        else:
            _print_auth(auth)
            print(f"quarantined: {printable(exc)}")
        return EX_OK
    if args.json:
        print(json_line({**shown, **asdict(decision)}))
    else:
        _print_decision(mail, loop, decision, auth)
    return EX_OK


def _auth_preview(args: argparse.Namespace, raw: bytes) -> AuthPreview | None:
    """The service's sender check on this mail (None for bare --rules without --service)."""
    settings = _auth_settings(args)
    if settings is None:
        return None
    return preview_authenticity(settings, raw, DnsTxtResolver() if args.dns else None)


def _auth_settings(args: argparse.Namespace) -> AuthSettings | None:
    if args.rules and not args.service:
        return None
    config = reading_config(args)
    return config.service(args.service or config.services[0].name).authentication


def _rules_of(args: argparse.Namespace) -> tuple[Ruleset, float, NotifySettings | None]:
    """The ruleset to test (files given, or the service's), its regex timeout and notify."""
    if args.rules:  # the config, where there is one, still supplies the schedules
        path = find_config_path(args.config)
        schedules = reading_config(args).schedules if path.is_file() else {}
        return load_ruleset(args.rules, schedules=schedules), 0.5, None
    settings = reading_config(args)  # rules only: no secrets needed
    service = settings.service(args.service or settings.services[0].name)
    ruleset = load_ruleset(list(service.rules), schedules=settings.schedules)
    return ruleset, settings.gateway.regex_timeout_seconds, service.notify


def _loop_guard_of(args: argparse.Namespace) -> dict[str, str]:
    """The loop guard setting to judge with: --loop-guard, else the service's (strict for
    bare --rules), and this installation's own-mail stamp."""
    if args.rules and not args.service:
        return {"mode": args.loop_guard or "strict", "installation_id": DEFAULT_INSTALLATION_ID}
    settings = reading_config(args)
    service = settings.service(args.service or settings.services[0].name)
    return {
        "mode": args.loop_guard or service.loop_guard,
        "installation_id": settings.gateway.installation_id,
    }


def run_pagerduty_event(args: argparse.Namespace) -> int:
    """What a PagerDuty-side event would do: the reverse rule, its action, theme, addresses."""
    raw = read_input(args.pagerduty_event)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{args.pagerduty_event}: not JSON: {exc}") from None
    event = body.get("event") if isinstance(body, dict) else None
    if not isinstance(event, dict):
        raise UsageError(f'{args.pagerduty_event}: expected a Webhooks v3 body {{"event": ...}}')
    ruleset, timeout, notify = _rules_of(args)
    facts = read_facts(event)
    fields = facts.rule_fields(None)
    decision = evaluate_pagerduty(ruleset, fields, regex_timeout=timeout)
    theme, to = decision.theme, decision.to
    if decision.rule is None and notify is not None and facts.event_type in notify.on:
        theme, to = notify.theme, notify.to  # the `notify.on` shorthand
    if args.json:
        record = {"fields": fields, "incident_key": facts.incident_key, **asdict(decision)}
        print(json_line({**record, "theme": theme if to else None, "to": list(to)}))
        return EX_OK
    print(f"{'key:':<9} {printable(facts.incident_key or facts.pd_id or '-')}")
    for name, value in fields.items():
        print(f"field:    {name} = {printable(value)}")
    print(f"{'rule:':<9} {printable(decision.rule or '(none: mirror, notify.on applies)')}")
    print(f"{'action:':<9} {decision.action}")
    mail = f"theme {theme} to {', '.join(to)}" if to else "none"
    print(f"{'mail:':<9} {printable(mail)}")
    print("trace:")
    for step in decision.trace:
        print(f"  {'✔' if step.matched else '✘'} {printable(step.rule)}: {printable(step.reason)}")
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


def _print_auth(auth: AuthPreview | None) -> None:
    if auth is None:
        return
    if auth.checked and auth.verdict.refusal is not None:
        print("note:     the sender check would keep this mail as unauthenticated; nothing sent")
    print(f"{'auth:':<9} {printable(auth.summary())}")


def _print_decision(
    mail: ParsedMail, loop: LoopVerdict, decision: Decision, auth: AuthPreview | None
) -> None:
    if loop.ignored:
        print(f"note:     the loop guard would ignore this mail: {printable(loop.describe())}")
    elif loop.signal:
        print(f"note:     the loop guard lets this mail through: {printable(loop.describe())}")
    _print_auth(auth)
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
