"""The `gateway` command: builds objects, calls one library function, maps errors to exit codes.

Exit codes: 0 ok, 1 usage or validation error, 75 (EX_TEMPFAIL) transient failure in `ingest`
so that an MTA pipe (Postfix `pipe`, procmail, fetchmail) retries the delivery later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import httpx
from tabulate import tabulate

from gateway import __version__, intake
from gateway.config import Config, find_config_path, load_config
from gateway.errors import ConfigError, GatewayError, RuleError, StoreError
from gateway.logs import setup_logging
from gateway.message import parse_message
from gateway.outbox import OutboxWorker, RetryPolicy
from gateway.pagerduty import PagerDutySender, RateLimiter
from gateway.processor import Processor, load_services
from gateway.rules import evaluate, load_ruleset
from gateway.store import Store, StoreThread

EX_OK, EX_USAGE, EX_TEMPFAIL = 0, 1, 75


class UsageError(GatewayError):
    """Bad arguments: printed as one line, exit 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EX_USAGE
    try:
        return args.handler(args)
    except (ConfigError, RuleError) as exc:
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
    from gateway import service  # imported lazily: aiosmtpd is only needed here

    config = _config(args)
    _setup_logging(config)
    return service.run(config)


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    services = load_services(config.services)
    rules = sum(len(s.ruleset.rules) for s in services.values())
    print(f"OK: {config.path}: {len(services)} service(s), {rules} rule(s)")
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
    store = Store(config.db_path)
    accepted = intake.accept_now(store, mail)
    if accepted.duplicate_of is not None:
        print(f"accepted as message {accepted.id} (duplicate of {accepted.duplicate_of})")
        return EX_OK
    print(f"accepted as message {accepted.id}")
    if args.no_deliver:
        return EX_OK
    try:
        for outcome in Processor(
            store, services, config.pagerduty, regex_timeout=config.gateway.regex_timeout_seconds
        ).process_all():
            print(f"{outcome.service}: {outcome.outcome} ({outcome.reason})")
        asyncio.run(
            _deliver_due(config, deadline=time.time() + 2 * config.pagerduty.timeout_seconds)
        )
    except GatewayError as exc:  # accepted already: later processing retries
        print(f"warning: accepted, processing deferred: {exc}", file=sys.stderr)
    return EX_OK


async def _deliver_due(config: Config, deadline: float) -> None:
    store = StoreThread(config.db_path)
    routing_keys = {s.name: s.routing_key for s in config.services if s.routing_key}
    limiter = (
        RateLimiter(config.pagerduty.rate_limit_per_minute)
        if config.pagerduty.rate_limit_per_minute
        else None
    )
    try:
        async with httpx.AsyncClient(timeout=config.pagerduty.timeout_seconds) as client:
            sender = PagerDutySender(
                client, config.pagerduty.events_url, routing_keys, rate_limiter=limiter
            )
            policy = RetryPolicy(give_up_after=config.pagerduty.max_retry_hours * 3600)
            await OutboxWorker(store, "pagerduty", sender, policy).run_until_idle(deadline)
    finally:
        store.close()


def cmd_incidents(args: argparse.Namespace) -> int:
    config = _config(args)
    store = Store(config.db_path)
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
    store = Store(config.db_path)
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
    store = Store(config.db_path)
    if args.action == "retry":
        if args.id is None and not args.all:
            raise UsageError("outbox retry needs an item ID or --all")
        count = store.requeue_outbox(None if args.all else args.id)
        print(f"re-queued {count} item(s)")
        return EX_OK if count or args.all else EX_USAGE
    if args.action == "flush":
        asyncio.run(_deliver_due(config, deadline=time.time() + 60))
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


def _describe(payload: dict) -> str:
    if "event_action" in payload:
        return f"{payload['event_action']} {payload.get('dedup_key', '')}"[:60]
    return str(payload.get("subject", ""))[:60]


if __name__ == "__main__":
    sys.exit(main())
