"""`require_authentication` at decision time: a spoofed mail may neither page nor resolve.

Per service (README "Sender authenticity"):

* `none` (the default): nothing is required. With an `authserv_id`, that MTA's verdicts still
  fill the rules' `auth.*` fields;
* `trusted_header`: the verdicts of the `Authentication-Results` header stamped by the
  `authserv_id` MTA; every other such header (anyone can write one) is ignored;
* `verify`: DKIM checked here (dkimpy), with DNS under `dns_timeout_seconds`.

A mail passes when a DKIM signature of one of `allowed_dkim_domains` passed, or DMARC passed
for a From domain in `allowed_from_domains`. One that does not is kept with the outcome
`unauthenticated` and the reason; nothing is sent. A DNS failure that stands between the mail and
a pass is `temporary`: the processor leaves the job pending and asks again later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.config import AuthSettings
from gateway.mail import authenticity
from gateway.mail.authenticity import NONE, PASS, AuthResults, TxtResolver
from gateway.mail.parse import ParsedMail


@dataclass(frozen=True)
class AuthVerdict:
    """What the check found, and whether the service may act on the mail."""

    results: AuthResults
    refusal: str | None = None  # why not; None: it may
    temporary: bool = False  # the refusal may turn into a pass: retry later


NOT_CHECKED = AuthVerdict(AuthResults())


def check_authenticity(
    settings: AuthSettings, raw: bytes | bytearray, resolver: TxtResolver
) -> AuthVerdict:
    """The service's authenticity verdict on one raw mail."""
    if settings.require == "verify":
        results = authenticity.verify(raw, resolver, settings.dns_timeout_seconds)
    elif settings.authserv_id:
        results = authenticity.trusted_results(raw, settings.authserv_id)
    else:
        return NOT_CHECKED
    if settings.require == "none" or _passes(settings, results):
        return AuthVerdict(results)
    # only our own lookups can succeed later; a trusted header's temperror is its final word
    temporary = results.temporary and settings.require == "verify"
    return AuthVerdict(results, _refusal(settings, results), temporary)


def with_auth_fields(mail: ParsedMail, verdict: AuthVerdict) -> ParsedMail:
    """The parsed mail carrying the `auth.*` fields the rules may test."""
    if verdict is NOT_CHECKED:
        return mail
    return replace(mail, auth=verdict.results.fields())


@dataclass(frozen=True)
class AuthPreview:
    """The sender check as `gateway test-rules` shows it: the verdict, or why there is none."""

    require: str
    verdict: AuthVerdict
    checked: bool  # False: verify mode without DNS, or nothing to check
    note: str = ""

    def summary(self) -> str:
        """One line: pass, or why the mail would be kept as `unauthenticated`."""
        if not self.checked:
            return self.note
        if self.verdict.refusal is not None:
            retry = " (a DNS failure: the gateway would try again later)"
            return self.verdict.refusal + (retry if self.verdict.temporary else "")
        found = self.verdict.results
        fields = ", ".join(
            f"{k.removeprefix('auth.')}={v or '-'}" for k, v in found.fields().items()
        )
        verdict = "passes" if self.require != "none" else "not required"
        return f"{verdict}; {found.source} says {fields}: {found.detail}"

    def as_dict(self) -> dict[str, object]:
        found = self.verdict.results
        return {
            "require": self.require,
            "checked": self.checked,
            "passed": (self.verdict.refusal is None) if self.checked else None,
            "temporary": self.verdict.temporary,
            "reason": self.verdict.refusal,
            "note": self.note,
            "source": found.source,
            "detail": found.detail,
            "fields": found.fields(),
        }


def preview_authenticity(
    settings: AuthSettings, raw: bytes | bytearray, resolver: TxtResolver | None
) -> AuthPreview:
    """The check a served gateway would make; `verify` only with a resolver (real DNS when
    the operator asks for it), since offline its answer would be a guess."""
    if settings.require == "verify" and resolver is None:
        note = 'not checked offline: require_authentication = "verify" needs DNS (add --dns)'
        return AuthPreview(settings.require, NOT_CHECKED, False, note)
    verdict = check_authenticity(settings, raw, resolver or _no_dns)
    if verdict is NOT_CHECKED:
        note = 'not required: require_authentication = "none" and no authserv_id'
        return AuthPreview(settings.require, verdict, False, note)
    return AuthPreview(settings.require, verdict, True)


def _no_dns(name: str, timeout: float) -> bytes | None:
    raise authenticity.DnsFailure("no DNS offline")


class DnsBudget:
    """A `TxtResolver` that counts the seconds spent waiting for DNS in one decision batch.

    Every mail of every service is decided on one thread, so a slow nameserver would hold up
    all of them, one timeout per uncached name. Once a batch has waited `seconds`, the
    processor leaves its remaining `verify` jobs pending for the next batch instead of asking
    (`exhausted`); mail of other services is decided meanwhile.
    """

    def __init__(
        self, resolver: TxtResolver, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.resolver, self.seconds, self.clock = resolver, seconds, clock
        self.spent = 0.0

    def new_batch(self) -> None:
        self.spent = 0.0

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.seconds

    def __call__(self, name: str, timeout: float) -> bytes | None:
        started = self.clock()
        try:
            return self.resolver(name, timeout)
        finally:
            self.spent += max(0.0, self.clock() - started)


def _passes(settings: AuthSettings, results: AuthResults) -> bool:
    if any(domain in settings.dkim_domains for domain in results.dkim_domains):
        return True
    return results.dmarc == PASS and results.dmarc_domain in settings.from_domains


def _refusal(settings: AuthSettings, results: AuthResults) -> str:
    wanted = []
    if settings.dkim_domains:
        wanted.append(f"a DKIM pass for d= {', '.join(settings.dkim_domains)}")
    if settings.from_domains:
        wanted.append(f"a DMARC pass for From {', '.join(settings.from_domains)}")
    found = f"dkim={results.dkim}"
    if results.dkim_domains:
        found += f" (d={', '.join(results.dkim_domains)})"
    found += f", dmarc={results.dmarc}"
    if results.dmarc_domain and results.dmarc != NONE:
        found += f" (From {results.dmarc_domain})"
    source = results.source or "no verdict"
    return (
        f'unauthenticated (require_authentication = "{settings.require}"): needs '
        f"{' or '.join(wanted)}; {source} says {found}: {results.detail}"
    )
