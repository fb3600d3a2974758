"""`gateway check`: validate what a running server's reload would load, and count it; and what
`serve` needs at start besides: a writable data_dir and a healthy database."""

from __future__ import annotations

import argparse

from gateway.cli.common import EX_OK, add_command
from gateway.config import find_config_path
from gateway.delivery.paging import local_mode_notice
from gateway.mail.loop_guard import strict_pack_notices
from gateway.store import verify_store


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers,
        "check",
        run,
        "validate config, rule files and themes, and the data_dir and database serve needs",
        "gateway check",
    )


def run(args: argparse.Namespace) -> int:
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
    print(f"OK: {verify_store(config.store_location)}")  # StoreError: exit 75, as `serve` would
    notice = local_mode_notice(config.services)
    if notice:  # valid, but nothing would page anyone: say so plainly
        print(f"NOTE: {notice}")
    for notice in strict_pack_notices(config.services):  # valid, but the guard eats the mail
        print(f"NOTE: {notice}")
    return EX_OK
