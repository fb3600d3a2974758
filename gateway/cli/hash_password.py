"""`gateway hash-password`: one line for the SMTP AUTH users file (gateway/intake/smtp_auth.py)."""

from __future__ import annotations

import argparse
import sys

from gateway.cli.common import EX_OK, UsageError, add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "hash-password",
        run,
        "hash a password for the SMTP users file (prompted, or one line on stdin)",
        "gateway hash-password helpdesk >> /etc/gateway/smtp-users",
    )
    p.add_argument("user", nargs="?", help="print USER:HASH, a complete users-file line")
    p.add_argument("--scheme", choices=["scrypt", "bcrypt"], default="scrypt")


def run(args: argparse.Namespace) -> int:
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
