"""Notification themes: sandboxed Jinja templates that render complete emails.

A theme is a folder in the templates directory (``[gateway] templates_dir``)::

    templates/<theme>/
        message.txt.j2    required: a header block, a blank line, then the text body
        message.html.j2   optional: an HTML body (autoescaped); with it the mail is
                          multipart/alternative (text + HTML)
        sample.json       optional: a sample context; `gateway check` renders the theme with it

The header block is the lines of ``message.txt.j2`` before the first empty line, one
``Name: value`` per line. Allowed names: To, Cc, From, Reply-To, Subject, In-Reply-To,
References, Auto-Submitted, Message-ID, Date, and any ``X-*``. A header whose value renders
empty is left out, so ``Cc: {{ cc | default('') }}`` is optional. Every ``{{ ... }}`` in the
header block is made single-line (every line break and control character becomes a space): a
case field cannot inject a header.
Message-ID (with the From domain) and Date are added when the theme does not set them.

Every mail the gateway sends on its own account is stamped ``X-Gateway-Loop: <installation_id>``
and ``Auto-Submitted: auto-generated`` (unless the theme set Auto-Submitted), so if it ever comes
back the loop guard (`gateway.mail.loop_guard`) ignores it, whatever the service's `loop_guard`
says. The one exception is a helpdesk's own notification rendered on its behalf to be taken in
(`gateway notify`, ``POST /notify``, ``for_intake=True``): it is that helpdesk's mail, meant to
open an incident, and carries no stamp.

Templates run in Jinja's immutable sandbox, with time and size budgets (`gateway.sandbox`), and
``StrictUndefined``: a missing variable is an
error naming the template file and line, never an empty string in a customer's email. Filters
beyond Jinja's own: ``datetime(fmt, tz)``, ``addr(name)`` and ``msgid``.
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2

from gateway.config import DEFAULT_INSTALLATION_ID, Config
from gateway.errors import Problem, ThemeError
from gateway.files import FileSnapshot
from gateway.mail.loop_guard import LOOP_HEADER
from gateway.sandbox import BudgetedSandbox

TEXT_FILE = "message.txt.j2"
HTML_FILE = "message.html.j2"
SAMPLE_FILE = "sample.json"
HEADERS = ("To", "Cc", "From", "Reply-To", "Subject", "In-Reply-To", "References",
           "Auto-Submitted", "Message-ID", "Date")  # fmt: skip
ADDRESS_HEADERS = frozenset({"to", "cc", "from", "reply-to"})
# 7bit: non-ASCII bodies are quoted-printable/base64, so any relay takes the mail (no 8BITMIME).
POLICY = SMTP.clone(cte_type="7bit")
THEME_SECONDS = 2.0  # per template; themes are bigger than rule templates, and rarer

_HEADER_LINE = re.compile(r"([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)")
# Every character str.splitlines() or RFC 5322 treats as a line break, and the other C0/C1
# controls: a header value keeps none of them.
_NEWLINES = re.compile(r"[\x00-\x1f\x7f\x80-\x9f\u2028\u2029]+")


# -- filters ----------------------------------------------------------------------------------


def format_datetime_filter(value: Any, fmt: str = "%Y-%m-%d %H:%M %Z", tz: str = "UTC") -> str:
    """Epoch seconds, ISO 8601 text or a datetime, shown in `tz`; naive times are taken as UTC."""
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    elif isinstance(value, datetime):
        moment = value
    else:
        raise TypeError(f"datetime filter: cannot read a date from {type(value).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"datetime filter: unknown time zone {tz!r}") from exc
    return moment.astimezone(zone).strftime(fmt)


def addr_filter(value: Any, name: str | None = None) -> str:
    """'jane@x' | addr('Jane') -> 'Jane <jane@x>'; a {name, email} mapping works as well."""
    if isinstance(value, Mapping):
        return formataddr((str(value.get("name") or ""), str(value.get("email") or "")))
    return formataddr((name or "", str(value)))


def msgid_filter(value: Any) -> str:
    """A Message-ID with its angle brackets, whether or not the context stored them."""
    text = str(value or "").strip().strip("<>")
    return f"<{text}>" if text else ""


def single_line(value: Any) -> Any:
    """Finalizer for the header block: a rendered value never starts a new header line."""
    if isinstance(value, str):
        return _NEWLINES.sub(" ", value)
    return value


def _environment(finalize: Callable[[Any], Any] | None) -> BudgetedSandbox:
    env = BudgetedSandbox(
        max_seconds=THEME_SECONDS,
        loader=None,
        undefined=jinja2.StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=finalize,
    )
    env.filters.update(datetime=format_datetime_filter, addr=addr_filter, msgid=msgid_filter)
    return env


# -- loading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Theme:
    """One compiled theme; `body_offset` maps rendered body lines back to file lines."""

    name: str
    text_path: Path
    headers: jinja2.Template
    body: jinja2.Template
    body_offset: int
    html_path: Path | None
    html: jinja2.Template | None
    sample_path: Path | None


def _split_header_block(source: str) -> tuple[str, str, int]:
    """(header source, body source, lines before the body) of a message.txt.j2 source."""
    lines = source.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if not line.strip():
            return "".join(lines[:index]), "".join(lines[index + 1 :]), index + 1
    return source, "", len(lines)


def _compile(env: jinja2.Environment, source: str, path: Path, offset: int = 0) -> jinja2.Template:
    """Compile with the real file name (tracebacks name it); `offset` blank lines keep numbering."""
    try:
        code = env.compile("\n" * offset + source, name=path.name, filename=str(path))
    except jinja2.TemplateSyntaxError as exc:
        raise ThemeError(Problem(str(path), f"syntax error: {exc.message}", exc.lineno)) from None
    return env.template_class.from_code(env, code, env.make_globals(None))


def _read(path: Path, files: FileSnapshot) -> str:
    try:
        return files.read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ThemeError(Problem(str(path), f"cannot read template: {exc}")) from None


class Themes:
    """Every theme of a templates directory, compiled once; `render()` builds an EmailMessage."""

    def __init__(
        self,
        directory: Path,
        *,
        files: FileSnapshot | None = None,
        installation_id: str = DEFAULT_INSTALLATION_ID,
    ) -> None:
        self.directory = directory
        self.installation_id = installation_id  # the X-Gateway-Loop stamp
        self.files = FileSnapshot() if files is None else files  # see gateway.files
        self._header_env = _environment(single_line)
        self._body_env = _environment(None)
        self.themes: dict[str, Theme] = {}
        problems: list[Problem] = []
        for folder in _theme_folders(directory, self.files):
            try:
                self.themes[folder.name] = self._load(folder)
            except ThemeError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ThemeError(problems)

    def _load(self, folder: Path) -> Theme:
        text_path = folder / TEXT_FILE
        header_src, body_src, offset = _split_header_block(_read(text_path, self.files))
        html_path = folder / HTML_FILE
        html_path = html_path if self.files.is_file(html_path) else None
        sample_path = folder / SAMPLE_FILE
        return Theme(
            name=folder.name,
            text_path=text_path,
            headers=_compile(self._header_env, header_src, text_path),
            body=_compile(self._body_env, body_src, text_path, offset),
            body_offset=offset,
            html_path=html_path,
            html=_compile(self._body_env, _read(html_path, self.files), html_path)
            if html_path
            else None,
            sample_path=sample_path if self.files.is_file(sample_path) else None,
        )

    def names(self) -> list[str]:
        return sorted(self.themes)

    def get(self, name: str) -> Theme:
        try:
            return self.themes[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ThemeError(
                Problem(str(self.directory / name), f"no such theme (known: {known})")
            ) from None

    def render(
        self,
        theme: str,
        context: Mapping[str, Any],
        *,
        default_from: str | None = None,
        for_intake: bool = False,
    ) -> EmailMessage:
        """Render `theme` with `context` into a complete message; ThemeError names file:line.

        `for_intake`: a helpdesk's notification rendered on its behalf, meant to be taken in by
        a gateway: no loop stamp. Everything else is the gateway's own mail and is stamped.
        """
        t = self.get(theme)
        header_text = _run(t.headers, context, t.text_path)
        body = _drop_padding(_run(t.body, context, t.text_path), t.body_offset)
        html = _run(t.html, context, t.html_path) if t.html and t.html_path else None
        msg = EmailMessage(policy=POLICY)
        _set_headers(msg, _parse_header_block(header_text, t.text_path), t.text_path)
        _complete(msg, t.text_path, default_from)
        del msg[LOOP_HEADER]  # only the gateway sets it, never a theme
        if not for_intake:
            stamp_own_mail(msg, self.installation_id)
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
            for part in msg.iter_parts():  # the email package repeats it in each part
                del part["MIME-Version"]
        return msg

    def render_sample(self, theme: str) -> EmailMessage:
        """Render a theme with its sample.json (what `gateway check` does)."""
        t = self.get(theme)
        if t.sample_path is None:
            path = t.text_path.parent / SAMPLE_FILE
            raise ThemeError(Problem(str(path), "missing: check renders every theme with it"))
        return self.render(theme, load_context(t.sample_path, files=self.files))


def themes_for(config: Config, *, files: FileSnapshot | None = None) -> Themes:
    """The configuration's themes, stamping its `installation_id` on the gateway's own mail.

    Build Themes this way wherever the gateway sends mail on its own account, so the loop
    guard recognises that mail when it comes back.
    """
    return Themes(
        config.gateway.templates_dir, files=files, installation_id=config.gateway.installation_id
    )


def _theme_folders(directory: Path, files: FileSnapshot) -> list[Path]:
    if not files.is_dir(directory):
        raise ThemeError(Problem(str(directory), "templates directory not found"))
    return sorted(p for p in files.iterdir(directory) if files.is_file(p / TEXT_FILE))


def load_context(path: Path, *, files: FileSnapshot | None = None) -> dict[str, Any]:
    """A JSON object from a file (a case, or a sample context)."""
    files = FileSnapshot() if files is None else files
    try:
        data = json.loads(files.read_text(path))
    except OSError as exc:
        raise ThemeError(Problem(str(path), f"cannot read: {exc.strerror}")) from None
    except json.JSONDecodeError as exc:
        raise ThemeError(Problem(str(path), f"invalid JSON: {exc.msg}", exc.lineno)) from None
    if not isinstance(data, dict):
        raise ThemeError(Problem(str(path), "must be a JSON object"))
    return data


# -- rendering --------------------------------------------------------------------------------


def _run(template: jinja2.Template, context: Mapping[str, Any], path: Path) -> str:
    """Render; any failure becomes a ThemeError at the template line that raised it."""
    try:
        env = template.environment
        assert isinstance(env, BudgetedSandbox)
        return env.render(template, context)
    except jinja2.TemplateError as exc:
        message = exc.message or type(exc).__name__
        if isinstance(exc, jinja2.exceptions.SecurityError):
            message = f"refused by the sandbox: {message}"
        raise ThemeError(Problem(str(path), message, _template_line(exc, path))) from None
    except Exception as exc:  # a filter raising (bad date, bad tz): same treatment
        message = f"{type(exc).__name__}: {exc}"
        raise ThemeError(Problem(str(path), message, _template_line(exc, path))) from None


def _drop_padding(text: str, count: int) -> str:
    """Remove the newlines `_compile` put before the body (fewer if `{%-` ate some)."""
    index = 0
    while index < count and text[index : index + 1] == "\n":
        index += 1
    return text[index:]


def _template_line(exc: BaseException, path: Path) -> int | None:
    """Jinja rewrites tracebacks to template lines; take the innermost frame in `path`."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    return lines[-1] if lines else getattr(exc, "lineno", None)


def _parse_header_block(text: str, path: Path) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _HEADER_LINE.fullmatch(line.strip())
        if match is None:
            raise ThemeError(Problem(str(path), f"header line is not 'Name: value': {line!r}"))
        name, value = _canonical_name(match.group(1), path), match.group(2).strip()
        if value:
            headers.append((name, value))
    return headers


def _canonical_name(name: str, path: Path) -> str:
    for known in HEADERS:
        if name.lower() == known.lower():
            return known
    if name.lower().startswith("x-"):
        return name
    allowed = ", ".join(HEADERS)
    raise ThemeError(Problem(str(path), f"header {name!r} not allowed (allowed: {allowed}, X-*)"))


def _set_headers(msg: EmailMessage, headers: Iterable[tuple[str, str]], path: Path) -> None:
    for name, value in headers:
        try:
            msg[name] = value
        except (ValueError, TypeError) as exc:
            raise ThemeError(Problem(str(path), f"header {name}: {exc}")) from None
        defects = getattr(msg[name], "defects", ())
        if name.lower() in ADDRESS_HEADERS and defects:
            raise ThemeError(Problem(str(path), f"header {name}: invalid address in {value!r}"))


def replace_header(msg: EmailMessage, name: str, value: str) -> None:
    """Set one header after rendering (`notify --to`), with the same checks as a theme's."""
    path = Path("<command line>")
    canonical = _canonical_name(name, path)
    del msg[canonical]
    _set_headers(msg, [(canonical, single_line(value).strip())], path)


def _complete(msg: EmailMessage, path: Path, default_from: str | None) -> None:
    """From (the default), Message-ID and Date when the theme left them out; To is required."""
    if "From" not in msg and default_from:
        _set_headers(msg, [("From", default_from)], path)
    for required in ("From", "To"):
        if required not in msg:
            raise ThemeError(Problem(str(path), f"the rendered message has no {required} header"))
    if "Message-ID" not in msg:
        msg["Message-ID"] = make_msgid(domain=_from_domain(msg))
    if "Date" not in msg:
        msg["Date"] = format_datetime(datetime.now(UTC))


def stamp_own_mail(msg: EmailMessage, installation_id: str) -> None:
    """Mark a mail as the gateway's own: the loop guard ignores it if it ever comes back."""
    msg[LOOP_HEADER] = installation_id
    if "Auto-Submitted" not in msg:
        msg["Auto-Submitted"] = "auto-generated"


def _from_domain(msg: EmailMessage) -> str | None:
    addresses: Sequence[Address] = msg["From"].addresses
    return (addresses[0].domain or None) if addresses else None


def recipients(msg: EmailMessage) -> list[str]:
    """The envelope recipients of a rendered message: every address in To and Cc."""
    found: list[str] = []
    for name in ("To", "Cc"):
        header = msg[name]
        for address in getattr(header, "addresses", ()) if header is not None else ():
            if address.addr_spec and address.addr_spec not in found:
                found.append(address.addr_spec)
    return found


# -- validation (`gateway check`) -------------------------------------------------------------


def check(directory: Path, *, files: FileSnapshot | None = None) -> list[Problem]:
    """Compile every theme and render it with its sample.json; [] when all is well."""
    try:
        themes = Themes(directory, files=files)
    except ThemeError as exc:
        return exc.problems
    problems: list[Problem] = []
    for name in themes.names():
        try:
            themes.render_sample(name)
        except ThemeError as exc:
            problems.extend(exc.problems)
    return problems


# -- contexts the gateway builds itself -------------------------------------------------------


def incident_context(
    event: str,
    incident: Any,
    *,
    to: Sequence[str],
    from_addr: str,
    note: str = "",
    agent: str = "",
) -> dict[str, Any]:
    """The context of `incident_update` (event: trigger|duplicate|acknowledge|resolve, or a
    PagerDuty webhook event type such as incident.acknowledged).

    `incident` is a store.Incident; it is flattened to plain values here so the theme (and its
    sample.json) only depend on this contract. `case` holds the fields of the mail that
    triggered the incident (subject, from, message_id, details); `note` the text of an
    `incident.annotated` event, `agent` who did it in PagerDuty.
    """
    case = {"subject": incident.summary, "from": "", "message_id": incident.case_message_id}
    case.update(getattr(incident, "case", {}) or {})
    case.setdefault("details", {})
    return {
        "event": event,
        "service": incident.service,
        "to": ", ".join(to),
        "from": from_addr,
        "case_message_id": incident.case_message_id,
        "case": case,
        "incident": {
            "service": incident.service,
            "key": incident.incident_key,
            "state": incident.state,
            "summary": incident.summary,
            "trigger_count": incident.trigger_count,
            "acknowledge_count": incident.acknowledge_count,
            "resolve_count": incident.resolve_count,
            "first_seen": incident.first_seen,
            "last_seen": incident.last_seen,
            "title": incident.summary,
            "status": getattr(incident, "pd_status", "") or incident.state,
            "assignee": getattr(incident, "assignees", ""),
            "priority": getattr(incident, "priority", ""),
            "urgency": getattr(incident, "urgency", ""),
            "html_url": getattr(incident, "pd_url", ""),
            "note": note,
            "agent": agent,
        },
    }
