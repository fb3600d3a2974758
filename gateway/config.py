"""config.toml -> typed, frozen settings, validated in one place.

Every mistake is reported with the file and the dotted key (``[[service]] #2 .rules``) so an
operator can fix it without reading code. Secrets are never written in the file: ``${VAR}`` (or
``${VAR:-default}``) is replaced from the environment, and a missing variable is an error.

Commands that only read (listings, `test-rules`, `purge --dry-run`) load with
``secrets=False``: the keys in `SECRET_KEYS` keep their ``${VAR}`` text unexpanded, so an
on-call engineer can run them without the service's secrets; `serve` and `check` expand all.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.config_time import HeartbeatSettings, read_heartbeats, read_maintenance, read_schedules
from gateway.errors import ConfigError, Problem
from gateway.files import FileSnapshot
from gateway.schedules import MaintenanceWindow, Schedule
from gateway.toml_locator import TomlLocator

DEFAULT_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
LOG_LEVELS = ("debug", "info", "warning", "error")
IMAP_SECURITY = ("tls", "starttls", "none")
SMTP_TLS = ("none", "starttls", "implicit")
# Webhooks v3 incident event types: the PagerDuty side's changes a service may be told of
PAGERDUTY_EVENTS = tuple(
    f"incident.{name}"
    for name in (
        "triggered", "acknowledged", "unacknowledged", "resolved", "reopened", "reassigned",
        "escalated", "delegated", "priority_updated", "annotated", "responder.added",
        "responder.replied", "status_update_published",
    )
)  # fmt: skip
NOTIFY_EVENTS = ("trigger", "duplicate", "acknowledge", "resolve", *PAGERDUTY_EVENTS)
DEFAULT_API_URL = "https://api.pagerduty.com"
# keys whose values are credentials: only the commands that talk to the outside expand them
SECRET_KEYS = frozenset(
    {"routing_key", "password", "oauth2_token", "oauth2_token_command", "token", "notify_token"}
    | {"webhook_secret", "api_token"}
)
SENDER_CHECKS = ("envelope", "header", "both")  # what allowed_senders is matched against
AUTH_KEYS = (
    "require_authentication",
    "authserv_id",
    "allowed_dkim_domains",
    "allowed_from_domains",
    "dns_timeout_seconds",
)
# require_authentication: what proves a sender (README "Sender authenticity")
AUTH_MODES = ("none", "trusted_header", "verify")
# strict: every Auto-Submitted mail is loop-ignored; replies: only auto-replies and bounces are,
# auto-generated/auto-notified notifications (cron, helpdesks) reach the rules
LOOP_GUARD_MODES = ("strict", "replies")
DEFAULT_INSTALLATION_ID = "gateway"  # the X-Gateway-Loop stamp when none is configured


@dataclass(frozen=True)
class GatewaySettings:
    data_dir: Path
    rules_dir: Path
    templates_dir: Path
    log_level: str = "info"
    log_format: str = "auto"  # auto | human | json
    retention_days: int = 30
    regex_timeout_seconds: float = 0.5
    installation_id: str = DEFAULT_INSTALLATION_ID  # stamped on, and recognised in, our own mail


# The default pacing backlog per store. Deciding on PostgreSQL costs round trips per batch, so
# small batches cost it more: at 50 a PostgreSQL node delivered a burst 18 % slower than
# unpaced, at 200 6 % (bench/ha.py); on SQLite 50 keeps delivery within 0.9x of intake.
IN_FLOW_BACKLOG_SQLITE = 50
IN_FLOW_BACKLOG_POSTGRES = 200


@dataclass(frozen=True)
class SmtpSettings:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    hostname: str = "localhost"
    max_message_bytes: int = 10 * 1024 * 1024
    max_connections: int = 100
    session_timeout_seconds: float = 300.0
    tls: str = "none"  # none | starttls | implicit
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    require_auth: bool = False
    auth_users_file: Path | None = None
    # Slot hogging: a session ends after this long however busy it is; DATA may go this long
    # without a byte; one address may hold this many sessions that have not authenticated.
    max_session_seconds: float = 600.0
    data_timeout_seconds: float = 120.0
    max_unauthenticated_per_ip: int = 20
    # Password guessing: failures per address within auth_lockout_seconds before a lockout of
    # that long; each failure is answered after a delay growing up to auth_failure_delay_seconds.
    auth_max_failures: int = 10
    auth_lockout_seconds: float = 300.0
    auth_failure_delay_seconds: float = 2.0
    # Pacing (Postfix's in_flow_delay): while more than in_flow_backlog accepted mails wait for
    # a decision, a new transaction waits up to in_flow_delay_seconds (either 0 = off).
    in_flow_backlog: int = IN_FLOW_BACKLOG_SQLITE  # PostgreSQL: IN_FLOW_BACKLOG_POSTGRES
    in_flow_delay_seconds: float = 1.0


DEFAULT_RATE_LIMIT_PER_MINUTE = 120  # PagerDuty: about 120 events a minute per routing key


@dataclass(frozen=True)
class PagerDutySettings:
    events_url: str = DEFAULT_EVENTS_URL
    timeout_seconds: float = 10.0
    max_retry_hours: float = 24.0
    # per routing key, PagerDuty's documented Events API rate; 0 = off
    rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE
    source: str = "email-gateway"
    client_url: str = ""  # shown as a link on the incident, e.g. this gateway's status page
    # two-way: Webhooks v3 secrets (several during rotation; none = POST /pagerduty/webhook off)
    webhook_secret: tuple[str, ...] = ()
    api_token: str = ""  # REST API token for rule actions (set_priority, add_note, ...)
    api_url: str = DEFAULT_API_URL
    api_from: str = ""  # the PagerDuty user's email the REST API wants in `From` for writes
    api_requester_id: str = ""  # that user's id: responder requests name their requester
    api_rate_limit_per_minute: int = 900  # PagerDuty allows about 960 REST calls/min per token


@dataclass(frozen=True)
class NotifySettings:
    theme: str
    to: tuple[str, ...]
    on: tuple[str, ...] = ("trigger", "resolve")


@dataclass(frozen=True)
class AuthSettings:
    """Sender authenticity of one service: what must pass before its rules may act."""

    require: str = "none"  # none | trusted_header | verify
    authserv_id: str = ""  # the upstream MTA whose Authentication-Results are trusted
    dkim_domains: tuple[str, ...] = ()  # a passing DKIM signature with one of these d=
    from_domains: tuple[str, ...] = ()  # or DMARC pass for one of these From domains
    dns_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class ServiceSettings:
    name: str
    addresses: tuple[str, ...]
    rules: tuple[Path, ...]
    routing_key: str | None = None
    allowed_senders: tuple[str, ...] = ()
    notify: NotifySettings | None = None
    allowed_senders_check: str = "envelope"  # envelope | header | both
    authentication: AuthSettings = AuthSettings()
    loop_guard: str = "strict"  # strict | replies (LOOP_GUARD_MODES)


@dataclass(frozen=True)
class ImapSettings:
    name: str
    host: str
    service: str
    username: str
    port: int = 993
    security: str = "tls"
    password: str | None = None
    oauth2_token: str | None = None
    oauth2_token_command: str | None = None
    folder: str = "INBOX"
    after: str = "seen"  # seen | delete | move:<folder>
    idle: bool = True
    poll_seconds: float = 60.0
    max_message_bytes: int = 10 * 1024 * 1024
    tls_verify: bool = True
    keepalive_seconds: float = 20.0  # IDLE renewal / NOOP interval: a hung server shows in ~50 s


@dataclass(frozen=True)
class OutgoingSettings:
    host: str = "127.0.0.1"
    port: int = 25
    security: str = "none"  # tls | starttls | none
    username: str | None = None
    password: str | None = None
    from_addr: str = "gateway@localhost"
    timeout_seconds: float = 30.0
    tls_verify: bool = True


@dataclass(frozen=True)
class WebSettings:
    listen: str = "127.0.0.1:8025"  # loopback by default; "" = web listener off
    token: str | None = None  # required by the status page's retry button
    notify_token: str | None = None  # bearer token of POST /notify/<theme>; unset = off
    outbox_max_age_seconds: float = 900.0  # /healthz fails when a pending item is older
    imap_max_silence_seconds: float = 900.0  # /healthz fails when a mailbox is silent longer
    job_max_age_seconds: float = 300.0  # ... when a mail waits longer for its decision
    dead_letter_hours: float = 24.0  # ... while a dead letter is younger than this
    worker_max_restarts: int = 3  # ... when the worker restarted this often
    worker_restart_window_seconds: float = 600.0  # ... within this window
    stale_incident_hours: float = 24.0  # the status page flags incidents open longer
    refresh_seconds: int = 60  # the status page reloads itself this often (0: never)
    webhook_max_age_seconds: float = 300.0  # /healthz fails when a PagerDuty webhook waits longer


@dataclass(frozen=True)
class StoreSettings:
    """Where the durable state lives: `url` None is SQLite in data_dir (the embedded default);
    `postgresql://user@host:port/db` is one database shared by several gateway nodes. `node`
    names this node on the status page and in /metrics (default: the host name)."""

    url: str | None = None
    node: str = ""


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    gateway: GatewaySettings
    smtp: SmtpSettings
    pagerduty: PagerDutySettings
    services: tuple[ServiceSettings, ...]
    imap: tuple[ImapSettings, ...] = ()
    outgoing: OutgoingSettings | None = None
    web: WebSettings = field(default_factory=WebSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    # gateway/config_time.py: named schedules, maintenance windows, expected mail
    schedules: dict[str, Schedule] = field(default_factory=dict)
    maintenance: tuple[MaintenanceWindow, ...] = ()
    heartbeats: tuple[HeartbeatSettings, ...] = ()

    def service(self, name: str) -> ServiceSettings:
        for service in self.services:
            if service.name == name:
                return service
        known = ", ".join(s.name for s in self.services)
        raise KeyError(f"unknown service {name!r} (configured: {known})")

    @property
    def db_path(self) -> Path:
        """The SQLite file in data_dir (the embedded default's database)."""
        return self.gateway.data_dir / "gateway.sqlite3"

    @property
    def store_location(self) -> str | Path:
        """What `open_store` opens: `[store] url`, else the SQLite file in data_dir."""
        return self.store.url or self.db_path

    @property
    def node(self) -> str:
        """This node's name: `[store] node`, else the host name."""
        return self.store.node or socket.gethostname()


def find_config_path(cli_value: str | None) -> Path:
    """--config, else $GATEWAY_CONFIG, else ./config.toml."""
    return Path(cli_value or os.environ.get("GATEWAY_CONFIG") or "config.toml")


def load_config(
    path: Path,
    environ: Mapping[str, str] | None = None,
    *,
    files: FileSnapshot | None = None,
    secrets: bool = True,
) -> Config:
    """Read, expand and validate config.toml; raises ConfigError with every problem found.

    `files` records what was read (and, frozen, replaces the disk): see `gateway.files`.
    `secrets=False` leaves the `SECRET_KEYS` unexpanded, for commands that never use them."""
    files = FileSnapshot() if files is None else files
    reader = _Reader(path, os.environ if environ is None else environ, files, secrets=secrets)
    try:
        text = files.read_text(path)
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(Problem(str(path), _not_found(path))) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(Problem(str(path), f"cannot read config file: {exc}")) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            Problem(str(path), f"TOML syntax error: {exc}", _toml_line(exc))
        ) from None
    reader.locator = TomlLocator(text)
    config = reader.build(data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def _not_found(path: Path) -> str:
    """Where the config was looked for, and how to point at another one."""
    where = path if path.is_absolute() else f"{path} (in {Path.cwd()})"
    return (
        f"config file not found: {where}; the config is --config PATH, else $GATEWAY_CONFIG, "
        "else ./config.toml: run from the directory that holds it or pass --config"
    )


def _toml_line(exc: tomllib.TOMLDecodeError) -> int | None:
    match = re.search(r"line (\d+)", str(exc))
    return int(match.group(1)) if match else None


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_BARE_ENV = re.compile(r"(?<![$\\])\$([A-Za-z_][A-Za-z0-9_]*)")  # $VAR: the shell's, not ours
_SECTIONS = ("gateway", "smtp", "pagerduty", "service", "imap", "outgoing", "web", "store")
_TIME_SECTIONS = ("schedules", "maintenance", "heartbeat")  # gateway/config_time.py


class _Reader:
    """Walks the TOML tables, converting and collecting problems instead of stopping at one."""

    def __init__(
        self, path: Path, environ: Mapping[str, str], files: FileSnapshot, *, secrets: bool = True
    ) -> None:
        self.path = path
        self.secrets = secrets
        self.base = path.parent.resolve()
        self.environ = environ
        self.files = files
        self.problems: list[Problem] = []
        self.locator: TomlLocator | None = None
        self.section: tuple[str, int] = ("", 0)  # the [table] / [[array]] item being read
        self.variables: dict[str, list[str]] = {}  # dotted key -> ${VAR} names it used

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(str(self.path), message, self.line_of(key), key=key))

    def line_of(self, dotted: str) -> int | None:
        """The line of a key inside the section being read (its header line as a fallback)."""
        if self.locator is None:
            return None
        name, nth = self.section
        if not name:
            return self.locator.top(dotted.split(".", 1)[0])
        span = self.locator.span(name, nth)
        inner = dotted.split(".", 1)[1] if "." in dotted else ""
        if span is None or not inner:
            return None if span is None else span[0] + 1
        return self.locator.locate(span, tuple(inner.split(".")))

    def in_section(self, name: str, nth: int = 0) -> None:
        self.section = (name, nth)

    def build(self, data: dict[str, Any]) -> Config:
        self.check_keys("", data, {*_SECTIONS, *_TIME_SECTIONS})
        self.in_section("gateway")
        gateway = self.gateway(self.table(data, "gateway"))
        services = []
        for i, t in enumerate(self.array(data, "service"), 1):
            self.in_section("service", i - 1)
            services.append(self.service(i, t, gateway))
        self.in_section("service")
        self.check_services(tuple(services))
        names = {s.name for s in services}
        imap = []
        for i, t in enumerate(self.array(data, "imap"), 1):
            self.in_section("imap", i - 1)
            imap.append(self.imap(i, t, names))
        self.in_section("outgoing")
        outgoing = self.outgoing(data["outgoing"]) if "outgoing" in data else None
        for service in services:
            if service.notify is not None and outgoing is None:
                self.problem(f"service {service.name!r}.notify", "needs an [outgoing] relay")
            if service.notify is not None and not service.notify.to:
                self.problem(f"service {service.name!r}.notify.to", "at least one address")
        self.in_section("smtp")
        smtp = self.smtp(self.table(data, "smtp"))
        self.in_section("pagerduty")
        pagerduty = self.pagerduty(self.table(data, "pagerduty"))
        self.in_section("web")
        web = self.web(self.table(data, "web"))
        self.in_section("store")
        store = self.store(self.table(data, "store"))
        if store.url is not None and "in_flow_backlog" not in self.table(data, "smtp"):
            smtp = replace(smtp, in_flow_backlog=IN_FLOW_BACKLOG_POSTGRES)
        schedules = read_schedules(self, data)
        maintenance = read_maintenance(self, data, names, schedules)
        heartbeats = read_heartbeats(self, data, names)
        return Config(
            path=self.path,
            gateway=gateway,
            smtp=smtp,
            pagerduty=pagerduty,
            services=tuple(services),
            imap=tuple(imap),
            outgoing=outgoing,
            web=web,
            store=store,
            schedules=schedules,
            maintenance=maintenance,
            heartbeats=heartbeats,
        )

    # -- generic helpers -------------------------------------------------------------------

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        return value

    def array(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, f"must be an array of tables ([[{key}]])")
            return []
        return value

    def check_keys(self, where: str, table: dict[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {guess[0]!r}? " if guess else ""
                self.problem(f"{where}.{key}".lstrip("."), f"unknown key ({hint}known: {known})")

    def get(
        self,
        where: str,
        table: dict[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        dotted = f"{where}.{key}"
        if key not in table:
            if required:
                self.problem(dotted, "is required")
            return default
        value = self.expand(dotted, table[key])
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            self.problem(dotted, f"must be {_kind_name(kinds)}, not a boolean")
            return default
        if not isinstance(value, kinds):
            self.problem(dotted, f"must be {_kind_name(kinds)}, got {type(value).__name__}")
            return default
        message = check(value) if check else None
        if message:
            self.problem(dotted, message)
            return default
        return value

    def strings(self, where: str, table: dict[str, Any], key: str) -> tuple[str, ...]:
        value = self.get(where, table, key, (list, str), [])
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) for v in items):
            self.problem(f"{where}.{key}", "must be a list of strings")
            return ()
        return tuple(self.expand(f"{where}.{key}", v) for v in items)

    def expand(self, dotted: str, value: Any) -> Any:
        """Replace ${VAR} from the environment; a missing or empty variable is a config error,
        and so is a shell-style $VAR that was meant to be expanded."""
        if not isinstance(value, str) or "$" not in value:
            return value
        if not self.secrets and dotted.rpartition(".")[2] in SECRET_KEYS:
            return value  # left as written: this command never uses it
        bare = _BARE_ENV.search(_ENV.sub("", value))
        if bare:
            name = bare.group(1)
            self.problem(dotted, f"${name} is not expanded here: write ${{{name}}}")
            return value

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            self.variables.setdefault(dotted, []).append(name)
            if self.environ.get(name):
                return self.environ[name]
            if default is not None:
                return default
            state = "is set but empty" if name in self.environ else "is not set"
            self.problem(dotted, f"environment variable {name} {state}")
            return ""

        return _ENV.sub(substitute, value)

    def source_of(self, dotted: str, value: str) -> str:
        """'the value' or 'the value of ${VAR}', with its length: for secrets that look wrong."""
        names = self.variables.get(dotted)
        origin = f"${{{names[0]}}}" if names else "the value"
        return f"{origin} has {len(value)} characters"

    def path_value(
        self, where: str, table: dict[str, Any], key: str, default: str | None
    ) -> Path | None:
        value = self.get(where, table, key, str, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    # -- sections --------------------------------------------------------------------------

    def gateway(self, t: dict[str, Any]) -> GatewaySettings:
        w = "gateway"
        self.check_keys(w, t, {f.name for f in _fields(GatewaySettings)})
        return GatewaySettings(
            data_dir=self.path_value(w, t, "data_dir", "data"),
            rules_dir=self.path_value(w, t, "rules_dir", "parsing_rules"),
            templates_dir=self.path_value(w, t, "templates_dir", "templates"),
            log_level=self.get(w, t, "log_level", str, "info", check=_one_of(LOG_LEVELS)),
            log_format=self.get(
                w, t, "log_format", str, "auto", check=_one_of(("auto", "human", "json"))
            ),
            retention_days=self.get(w, t, "retention_days", int, 30, check=_at_least(0)),
            regex_timeout_seconds=self.get(
                w, t, "regex_timeout_seconds", float, 0.5, check=_positive
            ),
            installation_id=self.get(
                w, t, "installation_id", str, DEFAULT_INSTALLATION_ID, check=_installation_id
            ),
        )

    def smtp(self, t: dict[str, Any]) -> SmtpSettings:
        w = "smtp"
        self.check_keys(w, t, {f.name for f in _fields(SmtpSettings)})
        listen = self.strings(w, t, "listen") or ("127.0.0.1:2525",)
        for item in listen:
            if _split_hostport(item) is None:
                self.problem(f"{w}.listen", f"{item!r} is not host:port (IPv6 as [::1]:2525)")
        settings = SmtpSettings(
            listen=listen,
            hostname=self.get(w, t, "hostname", str, "localhost"),
            max_message_bytes=self.get(
                w, t, "max_message_bytes", int, 10 * 1024 * 1024, check=_at_least(1024)
            ),
            max_connections=self.get(w, t, "max_connections", int, 100, check=_at_least(1)),
            session_timeout_seconds=self.get(
                w, t, "session_timeout_seconds", float, 300.0, check=_positive
            ),
            tls=self.get(w, t, "tls", str, "none", check=_one_of(SMTP_TLS)),
            tls_cert=self.path_value(w, t, "tls_cert", None),
            tls_key=self.path_value(w, t, "tls_key", None),
            require_tls=self.get(w, t, "require_tls", bool, False),
            require_auth=self.get(w, t, "require_auth", bool, False),
            auth_users_file=self.path_value(w, t, "auth_users_file", None),
            **self.smtp_limits(w, t),
        )
        if settings.tls != "none" and not (settings.tls_cert and settings.tls_key):
            self.problem(f"{w}.tls", "TLS enabled, but tls_cert and tls_key are not both set")
        if settings.require_tls and settings.tls == "none":
            self.problem(f"{w}.require_tls", "require_tls needs tls = 'starttls' or 'implicit'")
        if settings.require_auth and settings.auth_users_file is None:
            self.problem(f"{w}.require_auth", "require_auth needs auth_users_file")
        for key in ("tls_cert", "tls_key", "auth_users_file"):
            value = getattr(settings, key)
            if value is not None and not self.files.is_file(value):
                self.problem(f"{w}.{key}", f"file not found: {value}")
        return settings

    def smtp_limits(self, w: str, t: dict[str, Any]) -> dict[str, Any]:
        """The [smtp] keys that bound what clients may take and when (see SmtpSettings)."""
        kinds: dict[str, tuple[type, Callable[[Any], str | None]]] = {
            "max_session_seconds": (float, _positive),
            "data_timeout_seconds": (float, _positive),
            "max_unauthenticated_per_ip": (int, _at_least(1)),
            "auth_max_failures": (int, _at_least(1)),
            "auth_lockout_seconds": (float, _positive),
            "auth_failure_delay_seconds": (float, _at_least(0)),
            "in_flow_backlog": (int, _at_least(0)),
            "in_flow_delay_seconds": (float, _at_least(0)),
        }
        return {
            key: self.get(w, t, key, kind, getattr(SmtpSettings, key), check=check)
            for key, (kind, check) in kinds.items()
        }

    def pagerduty(self, t: dict[str, Any]) -> PagerDutySettings:
        w = "pagerduty"
        self.check_keys(w, t, {f.name for f in _fields(PagerDutySettings)})
        return PagerDutySettings(
            events_url=self.get(w, t, "events_url", str, DEFAULT_EVENTS_URL, check=_url),
            timeout_seconds=self.get(w, t, "timeout_seconds", float, 10.0, check=_positive),
            max_retry_hours=self.get(w, t, "max_retry_hours", float, 24.0, check=_positive),
            rate_limit_per_minute=self.get(
                w,
                t,
                "rate_limit_per_minute",
                int,
                DEFAULT_RATE_LIMIT_PER_MINUTE,
                check=_at_least(0),
            ),
            source=self.get(w, t, "source", str, "email-gateway"),
            client_url=self.get(w, t, "client_url", str, ""),
            webhook_secret=tuple(s for s in self.strings(w, t, "webhook_secret") if s),
            api_token=self.get(w, t, "api_token", str, ""),
            api_url=self.get(w, t, "api_url", str, DEFAULT_API_URL, check=_url),
            api_from=self.get(w, t, "api_from", str, ""),
            api_requester_id=self.get(w, t, "api_requester_id", str, ""),
            api_rate_limit_per_minute=self.get(
                w, t, "api_rate_limit_per_minute", int, 900, check=_at_least(1)
            ),
        )

    def service(self, index: int, t: dict[str, Any], gateway: GatewaySettings) -> ServiceSettings:
        w = f"service #{index}"
        self.check_keys(
            w,
            t,
            {"name", "addresses", "routing_key", "rules", "allowed_senders", "notify"}
            | {"allowed_senders_check", "loop_guard"}
            | set(AUTH_KEYS),
        )
        name = self.get(w, t, "name", str, f"service{index}", required=True)
        w = f"service {name!r}"
        rules = tuple(self.rule_path(w, gateway.rules_dir, r) for r in self.strings(w, t, "rules"))
        if not rules:
            self.problem(f"{w}.rules", "at least one rule file is required")
        routing_key = self.get(w, t, "routing_key", str, None) or None
        if routing_key is not None and len(routing_key) != 32 and self.secrets:
            got = self.source_of(f"{w}.routing_key", routing_key)
            self.problem(
                f"{w}.routing_key", f"a PagerDuty integration key has 32 characters; {got}"
            )
        return ServiceSettings(
            name=name,
            addresses=tuple(a.lower() for a in self.strings(w, t, "addresses")),
            rules=rules,
            routing_key=routing_key,
            allowed_senders=tuple(a.lower() for a in self.strings(w, t, "allowed_senders")),
            notify=self.notify(w, t["notify"]) if "notify" in t else None,
            allowed_senders_check=self.get(
                w, t, "allowed_senders_check", str, "envelope", check=_one_of(SENDER_CHECKS)
            ),
            authentication=self.authentication(w, t),
            loop_guard=self.get(w, t, "loop_guard", str, "strict", check=_one_of(LOOP_GUARD_MODES)),
        )

    def authentication(self, w: str, t: dict[str, Any]) -> AuthSettings:
        """The service's sender-authenticity keys; a mode without what it needs is an error."""
        settings = AuthSettings(
            require=self.get(
                w, t, "require_authentication", str, "none", check=_one_of(AUTH_MODES)
            ),
            authserv_id=self.get(w, t, "authserv_id", str, ""),
            dkim_domains=tuple(d.lower() for d in self.strings(w, t, "allowed_dkim_domains")),
            from_domains=tuple(d.lower() for d in self.strings(w, t, "allowed_from_domains")),
            dns_timeout_seconds=self.get(w, t, "dns_timeout_seconds", float, 5.0, check=_positive),
        )
        if settings.require == "trusted_header" and not settings.authserv_id:
            self.problem(
                f"{w}.authserv_id",
                "require_authentication = 'trusted_header' needs the authserv_id of the MTA to trust",
            )
        if settings.require != "none" and not (settings.dkim_domains or settings.from_domains):
            self.problem(
                f"{w}.require_authentication",
                "name who may send: allowed_dkim_domains and/or allowed_from_domains",
            )
        return settings

    def rule_path(self, where: str, rules_dir: Path, name: str) -> Path:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else rules_dir / path
        if not self.files.is_file(path):
            self.problem(f"{where}.rules", f"rule file not found: {path}")
        return path

    def notify(self, where: str, t: Any) -> NotifySettings | None:
        w = f"{where}.notify"
        if not isinstance(t, dict):
            self.problem(w, "must be a table { theme = ..., to = [...], on = [...] }")
            return None
        self.check_keys(w, t, {"theme", "to", "on"})
        on = self.strings(w, t, "on") or ("trigger", "resolve")
        for event in on:
            if event not in NOTIFY_EVENTS:
                self.problem(
                    f"{w}.on", f"unknown event {event!r} (known: {', '.join(NOTIFY_EVENTS)})"
                )
        return NotifySettings(
            theme=self.get(w, t, "theme", str, "incident_update", required=True),
            to=self.strings(w, t, "to"),
            on=on,
        )

    def check_services(self, services: tuple[ServiceSettings, ...]) -> None:
        seen: set[str] = set()
        for service in services:
            if service.name in seen:
                self.problem(f"service {service.name!r}.name", "duplicate service name")
            seen.add(service.name)

    def imap(self, index: int, t: dict[str, Any], services: set[str]) -> ImapSettings:
        w = f"imap #{index}"
        self.check_keys(w, t, {f.name for f in _fields(ImapSettings)})
        name = self.get(w, t, "name", str, f"imap{index}", required=True)
        w = f"imap {name!r}"
        security = self.get(w, t, "security", str, "tls", check=_one_of(IMAP_SECURITY))
        service = self.get(w, t, "service", str, "", required=True)
        if service and service not in services:
            self.problem(f"{w}.service", f"unknown service {service!r}")
        settings = ImapSettings(
            name=name,
            host=self.get(w, t, "host", str, "", required=True),
            service=service,
            username=self.get(w, t, "username", str, "", required=True),
            port=self.get(w, t, "port", int, 993 if security == "tls" else 143, check=_port),
            security=security,
            password=self.get(w, t, "password", str, None),
            oauth2_token=self.get(w, t, "oauth2_token", str, None),
            oauth2_token_command=self.get(w, t, "oauth2_token_command", str, None),
            folder=self.get(w, t, "folder", str, "INBOX"),
            after=self.get(w, t, "after", str, "seen", check=_imap_after),
            idle=self.get(w, t, "idle", bool, True),
            poll_seconds=self.get(w, t, "poll_seconds", float, 60.0, check=_positive),
            max_message_bytes=self.get(
                w, t, "max_message_bytes", int, 10 * 1024 * 1024, check=_at_least(1024)
            ),
            tls_verify=self.get(w, t, "tls_verify", bool, True),
            keepalive_seconds=self.get(w, t, "keepalive_seconds", float, 20.0, check=_keepalive),
        )
        credentials = [settings.password, settings.oauth2_token, settings.oauth2_token_command]
        if sum(c is not None for c in credentials) != 1:
            self.problem(w, "set exactly one of password, oauth2_token, oauth2_token_command")
        return settings

    def outgoing(self, t: Any) -> OutgoingSettings | None:
        w = "outgoing"
        if not isinstance(t, dict):
            self.problem(w, "must be a table")
            return None
        self.check_keys(
            w, t, ({f.name for f in _fields(OutgoingSettings)} - {"from_addr"}) | {"from"}
        )
        security = self.get(w, t, "security", str, "none", check=_one_of(IMAP_SECURITY))
        return OutgoingSettings(
            host=self.get(w, t, "host", str, "127.0.0.1"),
            port=self.get(
                w, t, "port", int, {"tls": 465, "starttls": 587}.get(security, 25), check=_port
            ),
            security=security,
            username=self.get(w, t, "username", str, None),
            password=self.get(w, t, "password", str, None),
            from_addr=self.get(w, t, "from", str, "gateway@localhost"),
            timeout_seconds=self.get(w, t, "timeout_seconds", float, 30.0, check=_positive),
            tls_verify=self.get(w, t, "tls_verify", bool, True),
        )

    def store(self, t: dict[str, Any]) -> StoreSettings:
        w = "store"
        self.check_keys(w, t, {f.name for f in _fields(StoreSettings)})
        return StoreSettings(
            url=self.get(w, t, "url", str, None, check=_store_url) or None,
            node=self.get(w, t, "node", str, ""),
        )

    def web(self, t: dict[str, Any]) -> WebSettings:
        w = "web"
        self.check_keys(w, t, {f.name for f in _fields(WebSettings)})
        listen = self.get(w, t, "listen", str, WebSettings.listen)
        if listen and _split_hostport(listen) is None:
            self.problem(f"{w}.listen", f"{listen!r} is not host:port")
        return WebSettings(
            listen=listen,
            token=self.get(w, t, "token", str, None) or None,
            notify_token=self.get(w, t, "notify_token", str, None) or None,
            outbox_max_age_seconds=self.get(
                w, t, "outbox_max_age_seconds", float, 900.0, check=_positive
            ),
            imap_max_silence_seconds=self.get(
                w, t, "imap_max_silence_seconds", float, 900.0, check=_positive
            ),
            **{  # the health thresholds: numbers greater than 0
                name: self.get(w, t, name, float, getattr(WebSettings, name), check=_positive)
                for name in _WEB_THRESHOLDS
            },
            worker_max_restarts=self.get(w, t, "worker_max_restarts", int, 3, check=_at_least(1)),
            refresh_seconds=self.get(w, t, "refresh_seconds", int, 60, check=_at_least(0)),
        )


def _store_url(value: str) -> str | None:
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in ("postgresql", "postgres"):
        return "must be a postgresql://user@host:port/database URL (leave it out for SQLite)"
    return None


_WEB_THRESHOLDS = (
    "job_max_age_seconds",
    "dead_letter_hours",
    "worker_restart_window_seconds",
    "stale_incident_hours",
    "webhook_max_age_seconds",
)


def _fields(cls: type) -> tuple[Any, ...]:
    return cls.__dataclass_fields__.values()  # type: ignore[attr-defined]


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"


def _installation_id(value: str) -> str | None:
    """It goes into a header of every mail we send: one short token, nothing to inject."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        return None
    return f"must be 1-64 letters, digits, '.', '_' or '-' (got {value!r})"


def _at_least(minimum: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= minimum else f"must be at least {minimum}"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _keepalive(value: float) -> str | None:
    # RFC 2177: servers may drop a client that has not renewed IDLE for 29 minutes
    return None if 0 < value <= 1500 else "must be more than 0 and at most 1500 seconds"


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


def _url(value: str) -> str | None:
    return None if value.startswith(("http://", "https://")) else "must be an http(s) URL"


def _imap_after(value: str) -> str | None:
    if value in ("seen", "delete") or (value.startswith("move:") and len(value) > 5):
        return None
    return "must be 'seen', 'delete' or 'move:<folder>'"


def _split_hostport(value: str) -> tuple[str, int] | None:
    """'127.0.0.1:2525' / '[::1]:2525' / ':2525' -> (host, port); None if malformed."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not match:
        return None
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    return (host, port) if 0 <= port < 65536 else None


def split_hostport(value: str) -> tuple[str, int]:
    """Public form for listeners: config validation already guaranteed it parses."""
    parsed = _split_hostport(value)
    if parsed is None:
        raise ValueError(f"not host:port: {value!r}")
    return parsed
