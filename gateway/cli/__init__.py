"""The `gateway` command: builds objects, calls one library function, maps errors to exit codes.

Exit codes: 0 ok, 1 usage or validation error, 75 (EX_TEMPFAIL) transient failure in `ingest`
so that an MTA pipe (Postfix `pipe`, procmail, fetchmail) retries the delivery later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from tabulate import tabulate

from gateway import __version__
from gateway.config import Config, find_config_path, load_config
from gateway.decide.notifications import build_helpdesk_notifier
from gateway.decide.processor import Processor, load_services
from gateway.delivery import dispatch as delivery
from gateway.errors import ConfigError, GatewayError, RuleError, StoreError, ThemeError
from gateway.intake import spool as intake
from gateway.logs import setup_logging
from gateway.mail.parse import parse_message
from gateway.rules import evaluate, load_ruleset
from gateway.store import Store, open_store

EX_OK, EX_USAGE, EX_TEMPFAIL = 0, 1, 75


class UsageError(GatewayError):
    """Bad arguments: printed as one line, exit 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format:  # through the environment so the worker child process follows
        os.environ["GATEWAY_LOG_FORMAT"] = args.log_format
    if not hasattr(args, "handler"):
        parser.print_help()
        return EX_USAGE
    try:
        return args.handler(args)
    except (ConfigError, RuleError, ThemeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    except (UsageError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EX_USAGE
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Email-parsing gateway: helpdesk mail -> parsing rules -> PagerDuty.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument(
        "--config", help="config file (default: $GATEWAY_CONFIG, else ./config.toml)"
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "human", "json"],
        help="override [gateway] log_format (auto: JSON lines under systemd or when piped)",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str, example: str
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}\n\nExample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    command("serve", cmd_serve, "run the SMTP listener, processor and dispatchers", "gateway serve")
    command("check", cmd_check, "validate config, rule files and themes", "gateway check")

    p = command(
        "test-rules",
        cmd_test_rules,
        "show the decision for one email without sending anything",
        "gateway test-rules tests/fixtures/desk_new.eml",
    )
    p.add_argument("file", help="an .eml file, or - for standard input")
    p.add_argument("--service", help="service whose rules to use (default: the first)")
    p.add_argument("--rules", nargs="+", type=Path, help="rule files to use instead of a service's")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")

    p = command(
        "ingest",
        cmd_ingest,
        "accept one email (exit 0 once durable, 75 to retry later), process and deliver it",
        "gateway ingest mail.eml --service helpdesk",
    )
    p.add_argument("file", help="an .eml file, or - for standard input")
    p.add_argument("--service", required=True, help="service the mail is for")
    p.add_argument("--sender", default=None, help="envelope sender (empty string for bounces)")
    p.add_argument("--no-deliver", action="store_true", help="only accept; leave the rest to serve")

    p = command(
        "imap-once",
        cmd_imap_once,
        "fetch new mail from one [[imap]] account once (for cron), process and deliver it",
        "gateway imap-once desk-mailbox",
    )
    p.add_argument("name", help="the name of an [[imap]] account in the config")
    p.add_argument("--no-deliver", action="store_true", help="only accept; leave the rest to serve")

    p = command(
        "incidents", cmd_incidents, "list the local incident mirror", "gateway incidents --open"
    )
    p.add_argument("--open", action="store_true", help="only triggered/acknowledged incidents")
    p.add_argument("--service", help="only this service")

    p = command(
        "messages",
        cmd_messages,
        "list recent messages with their decision and reason",
        "gateway messages --outcome unmatched quarantined",
    )
    p.add_argument("--outcome", nargs="+", help="only these outcomes")
    p.add_argument("--limit", type=int, default=50)

    p = command(
        "outbox", cmd_outbox, "list pending and dead outbox items", "gateway outbox retry --all"
    )
    p.add_argument("action", nargs="?", choices=["list", "retry", "flush"], default="list")
    p.add_argument("id", nargs="?", type=int, help="item to retry")
    p.add_argument("--all", action="store_true", help="retry every dead letter")

    p = command(
        "render",
        cmd_render,
        "print the email a notification theme renders for a case (JSON)",
        "gateway render case_new --case tests/fixtures/case29.json",
    )
    p.add_argument("theme", help="theme name (a folder in templates_dir)")
    p.add_argument("--case", required=True, type=Path, help="the context, a JSON object")
    p.add_argument("--to", help="override the To address")
    p.add_argument("--templates", type=Path, help="templates directory instead of the config's")

    p = command(
        "notify",
        cmd_notify,
        "render a theme for a case and send it through [outgoing] (via the outbox)",
        "gateway notify case_new --case tests/fixtures/case29.json --to desk@localhost",
    )
    p.add_argument("theme", help="theme name (a folder in templates_dir)")
    p.add_argument("--case", required=True, type=Path, help="the context, a JSON object")
    p.add_argument("--to", help="override the To address (and the recipient)")

    # -- SMTP AUTH users file (gateway/auth.py) --
    p = command(
        "hash-password",
        cmd_hash_password,
        "hash a password for the SMTP users file (prompted, or one line on stdin)",
        "gateway hash-password helpdesk >> /etc/gateway/smtp-users",
    )
    p.add_argument("user", nargs="?", help="print USER:HASH, a complete users-file line")
    p.add_argument("--scheme", choices=["scrypt", "bcrypt"], default="scrypt")

    # -- operations (gateway/retention.py, gateway/replay.py) --
    p = command(
        "purge",
        cmd_purge,
        "delete stored mail, decisions and events older than retention_days"
        " (open incidents, pending jobs and outbox items are kept)",
        "gateway purge --dry-run",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--days", type=int, help="override [gateway] retention_days")

    p = command(
        "replay",
        cmd_replay,
        "re-run stored mail through the current or candidate rules and show what would change;"
        " never sends or changes anything",
        "gateway replay --since 2h --rules /tmp/new-rules/",
    )
    p.add_argument("--since", default="24h", help="how far back: 30m, 2h, 7d or an ISO date")
    p.add_argument(
        "--rules",
        nargs="+",
        type=Path,
        help="candidate rules: a directory (each service's file names) or files (all services)",
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--all", action="store_true", help="also list messages that would not change")
    p.add_argument(
        "--dry-run", action="store_true", help="accepted for clarity: replay never acts anyway"
    )
    return parser


# -- helpers ----------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def _setup_logging(config: Config, default: str | None = None) -> None:
    setup_logging(default or config.gateway.log_level, config.gateway.log_format)


def _read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _print_table(rows: list[list[object]], headers: list[str], empty: str) -> None:
    print(tabulate(rows, headers=headers) if rows else empty)


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.runtime import service  # imported lazily: aiosmtpd is only needed here

    config = _config(args)
    _setup_logging(config)
    return service.run(config)


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.runtime.reload import (
        load_generation,  # exactly what a running server's reload runs
    )
    from gateway.themes import render as themes

    validated = load_generation(find_config_path(args.config))
    config, services = validated.config, validated.services
    rules = sum(len(s.ruleset.rules) for s in services.values())
    templates = config.gateway.templates_dir
    count = len(themes.Themes(templates).names()) if templates.exists() else 0
    print(f"OK: {config.path}: {len(services)} service(s), {rules} rule(s), {count} theme(s)")
    return EX_OK


def cmd_test_rules(args: argparse.Namespace) -> int:
    raw = _read_input(args.file)
    if args.rules:
        ruleset = load_ruleset(args.rules)
        timeout = 0.5
    else:
        config = _config(args)
        name = args.service or config.services[0].name
        ruleset = load_ruleset(list(config.service(name).rules))
        timeout = config.gateway.regex_timeout_seconds
    mail = parse_message(raw)
    try:
        decision = evaluate(ruleset, mail, regex_timeout=timeout)
    except GatewayError as exc:
        print(f"quarantined: {exc}")
        return EX_OK
    _print_decision(mail, decision, as_json=args.json)
    return EX_OK


def _print_decision(mail, decision, *, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(decision), indent=2, ensure_ascii=False, default=str))
        return
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


def cmd_ingest(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        services = load_services(config.services)
    except (ConfigError, RuleError) as exc:
        # A broken config is the operator's to fix; the MTA must keep the mail and retry.
        print(f"error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    _setup_logging(config, "warning")
    config.service(args.service)
    raw = _read_input(args.file)
    mail = intake.incoming(raw, source="cli", services=(args.service,), mail_from=args.sender)
    store = open_store(config.db_path)
    [accepted] = store.accept([mail])  # one durable commit: only then exit 0
    if accepted.duplicate_of is not None:
        print(f"accepted as message {accepted.id} (duplicate of {accepted.duplicate_of})")
        return EX_OK
    print(f"accepted as message {accepted.id}")
    if args.no_deliver:
        return EX_OK
    _process_and_deliver(config, services, store)
    return EX_OK


def _process_and_deliver(config: Config, services, store: Store) -> None:
    """After acceptance: decide, then try to deliver once. Failures only defer the work (the
    mail is durable): `gateway serve` or `gateway outbox flush` picks it up later."""
    try:
        processor = Processor(
            store,
            services,
            config.pagerduty,
            regex_timeout=config.gateway.regex_timeout_seconds,
            notifier=build_helpdesk_notifier(config),
        )
        for outcome in processor.process_all():
            print(f"{outcome.service}: {outcome.outcome} ({outcome.reason})")
        asyncio.run(delivery.deliver_due(config, 2 * config.pagerduty.timeout_seconds))
    except GatewayError as exc:
        print(f"warning: accepted, processing deferred: {exc}", file=sys.stderr)


def cmd_imap_once(args: argparse.Namespace) -> int:
    """One IMAP fetch cycle, then process and deliver like `ingest`; 75 if the mailbox failed."""
    from gateway.intake import imap  # imported lazily: only this command and serve need imapclient

    config = _config(args)
    services = load_services(config.services)
    _setup_logging(config, "warning")
    account = next((a for a in config.imap if a.name == args.name), None)
    if account is None:
        known = ", ".join(a.name for a in config.imap) or "none"
        raise UsageError(f"unknown imap account {args.name!r} (configured: {known})")
    store = open_store(config.db_path)
    try:
        result = imap.run_once(account, store)
    except imap.ImapAuthError as exc:
        print(f"error: imap {account.name}: {exc}", file=sys.stderr)
        return EX_USAGE
    except (imap.ImapError, OSError, imap.IMAPClient.Error) as exc:
        print(f"error: imap {account.name}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    print(
        f"{account.name}: accepted {result.accepted} message(s) ({result.duplicates} duplicate),"
        f" {result.oversize} left in place as too big"
    )
    if args.no_deliver:
        return EX_OK
    _process_and_deliver(config, services, store)
    return EX_OK


def cmd_incidents(args: argparse.Namespace) -> int:
    config = _config(args)
    store = open_store(config.db_path)
    rows = [
        [
            i.service,
            i.incident_key,
            i.state,
            i.trigger_count,
            i.acknowledge_count,
            i.resolve_count,
            _when(i.first_seen),
            _when(i.last_seen),
        ]
        for i in store.incidents(open_only=args.open)
        if not args.service or i.service == args.service
    ]
    headers = ["service", "key", "state", "triggers", "acks", "resolves", "first seen", "last seen"]
    _print_table(rows, headers, "no incidents")
    return EX_OK


def cmd_messages(args: argparse.Namespace) -> int:
    config = _config(args)
    store = open_store(config.db_path)
    rows = [
        [
            j.message,
            _when(j.received_at),
            j.source,
            j.service,
            j.outcome or "pending",
            j.rule or "-",
            j.incident_key or "-",
            j.reason or "",
        ]
        for j in store.jobs(outcomes=args.outcome, limit=args.limit)
    ]
    headers = ["message", "received", "source", "service", "outcome", "rule", "key", "reason"]
    _print_table(rows, headers, "no messages")
    return EX_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    config = _config(args)
    store = open_store(config.db_path)
    if args.action == "retry":
        if args.id is None and not args.all:
            raise UsageError("outbox retry needs an item ID or --all")
        count = store.requeue_outbox(None if args.all else args.id)
        print(f"re-queued {count} item(s)")
        return EX_OK if count or args.all else EX_USAGE
    if args.action == "flush":
        asyncio.run(delivery.deliver_due(config, 60))
    rows = [
        [
            o.id,
            o.kind,
            o.service,
            o.state,
            o.attempts,
            _when(o.created_at),
            _when(o.next_attempt_at) if o.state == "pending" else "-",
            (o.last_error or "")[:80],
            _describe(o.payload),
        ]
        for o in store.outbox()
    ]
    headers = [
        "id",
        "kind",
        "service",
        "state",
        "attempts",
        "created",
        "next try",
        "last error",
        "item",
    ]
    _print_table(rows, headers, "outbox is empty")
    return EX_OK


def _render_case(args: argparse.Namespace, directory: Path, default_from: str):
    """Render args.theme with args.case; theme problems become one clear error (exit 1)."""
    from gateway.themes import render as themes

    try:
        context = themes.load_context(args.case)
        msg = themes.Themes(directory).render(args.theme, context, default_from=default_from)
        if args.to:
            themes.replace_header(msg, "To", args.to)
    except themes.ThemeError as exc:
        raise UsageError(str(exc)) from None
    return msg


def cmd_render(args: argparse.Namespace) -> int:
    from gateway.config import OutgoingSettings
    from gateway.themes.render import POLICY

    config = None if args.templates else _config(args)
    directory = args.templates or config.gateway.templates_dir
    outgoing = (config.outgoing if config else None) or OutgoingSettings()
    msg = _render_case(args, directory, outgoing.from_addr)
    sys.stdout.write(msg.as_string(policy=POLICY.clone(linesep="\n")))
    return EX_OK


def cmd_notify(args: argparse.Namespace) -> int:
    from gateway.decide import outgoing_mail

    config = _config(args)
    if config.outgoing is None:
        raise UsageError(f"{config.path}: no [outgoing] section (set host, port and from)")
    _setup_logging(config, "warning")
    msg = _render_case(args, config.gateway.templates_dir, config.outgoing.from_addr)
    store = open_store(config.db_path)
    try:
        sender = outgoing_mail.envelope_sender(config.outgoing.from_addr)
        item = outgoing_mail.queue_mail(store, msg, mail_from=sender)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    asyncio.run(delivery.deliver_due(config, 2 * config.outgoing.timeout_seconds))
    left = {o.id: o for o in store.outbox(("pending", "dead"), limit=100_000)}.get(item)
    if left is None:
        print(f"sent {msg['Message-ID']} to {', '.join(outgoing_mail.recipients(msg))}")
        return EX_OK
    if left.state == "dead":
        print(f"error: relay refused outbox item {item}: {left.last_error}", file=sys.stderr)
        return EX_USAGE
    print(
        f"queued as outbox item {item}, not delivered yet ({left.last_error}); "
        "`gateway serve` retries it",
        file=sys.stderr,
    )
    return EX_OK


def _describe(payload: dict) -> str:
    if "event_action" in payload:
        return f"{payload['event_action']} {payload.get('dedup_key', '')}"[:60]
    return str(payload.get("subject", ""))[:60]


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Read the password without echo on a terminal; a pipe gives one line (for scripts)."""
    import getpass

    from gateway.intake.smtp_auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("empty password")
    if args.user and ":" in args.user:
        raise UsageError("a user name cannot contain ':'")
    try:
        hashed = hash_password(password, args.scheme)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.user}:{hashed}" if args.user else hashed)
    return EX_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from gateway.runtime import retention

    config = _config(args)
    days = config.gateway.retention_days if args.days is None else args.days
    if days <= 0:
        print("retention_days is 0: everything is kept, nothing to purge")
        return EX_OK
    store = open_store(config.db_path)
    if args.dry_run:
        counts = retention.plan(store, days)
        print(f"would delete (older than {days} days): {retention.describe(counts)}")
        return EX_OK
    counts = retention.purge(store, days)
    print(f"deleted (older than {days} days): {retention.describe(counts)}")
    return EX_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.decide import replay

    config = _config(args)
    try:
        since = replay.parse_since(args.since)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    services = load_services(config.services)
    if args.rules:
        services = replay.candidate_rules(args.rules, services)
    if args.service:
        config.service(args.service)  # KeyError names the configured services
    results = replay.replay(
        open_store(config.db_path),
        services,
        since,
        regex_timeout=config.gateway.regex_timeout_seconds,
        only_service=args.service,
    )
    rows = [
        [r.message, _when(r.received_at), r.service, r.subject[:50], str(r.old), str(r.new)]
        for r in results
        if r.changed or args.all
    ]
    headers = ["message", "received", "service", "subject", "stored decision", "would now be"]
    _print_table(rows, headers, "no differences")
    print(replay.summary(results))
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
