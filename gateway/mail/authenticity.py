"""Who really sent a mail: DKIM checked here with dkimpy, or the verdicts that a trusted upstream
MTA stamped into its `Authentication-Results` header, read with authres.

This module only finds out; what must pass for a service is `gateway.decide.authenticity`'s.
Every DNS lookup goes through an injectable `TxtResolver` under a timeout, and a lookup that
fails (timeout, SERVFAIL, no nameserver) is `temperror`: never a pass and never a fail, so the
caller can try again later. A name that does not exist or has no TXT record is simply absent.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import authres
import dkim
from publicsuffixlist import PublicSuffixList

from gateway.mail.addresses import header_address, header_values
from gateway.mail.parse import AUTH_FIELDS

log = logging.getLogger(__name__)
__all__ = ["AUTH_FIELDS", "AuthResults", "DnsFailure", "DnsTxtResolver", "TxtResolver"]

NONE, PASS, FAIL, TEMPERROR, PERMERROR = "none", "pass", "fail", "temperror", "permerror"
MAX_SIGNATURES = 5  # DKIM-Signature headers verified per mail: each may cost a DNS lookup
MAX_RESULTS_HEADERS = 50  # Authentication-Results headers looked at per mail


class DnsFailure(Exception):
    """A lookup that could not be answered now (timeout, SERVFAIL): try again later."""


# (name, timeout seconds) -> the TXT record's text (strings joined), None if there is none
TxtResolver = Callable[[str, float], bytes | None]


@dataclass(frozen=True)
class AuthResults:
    """What is known of a mail's authenticity, as the rules' `auth.*` fields show it."""

    dkim: str = NONE  # best result over the signatures: pass > temperror > fail > permerror
    spf: str = NONE
    dmarc: str = NONE
    dkim_domains: tuple[str, ...] = ()  # `d=` of every passing signature, lower case
    dmarc_domain: str = ""  # the From domain that DMARC judged
    source: str = ""  # 'dkimpy' or 'Authentication-Results of <authserv-id>'
    detail: str = ""  # for reasons: per-signature results, the DNS problem
    unsettled: bool = False  # some signature's lookup failed, even if another one passed

    @property
    def temporary(self) -> bool:
        """A DNS problem kept some check from finishing: the verdict may change later."""
        return self.unsettled or TEMPERROR in (self.dkim, self.dmarc)

    def fields(self) -> dict[str, str]:
        """The rules' condition fields; several passing domains are one per line."""
        return {
            "auth.dkim": self.dkim,
            "auth.spf": self.spf,
            "auth.dmarc": self.dmarc,
            "auth.dkim_domain": "\n".join(self.dkim_domains),
        }


# --------------------------------------------------------------------------- trusted header


def trusted_results(raw: bytes | bytearray, authserv_id: str) -> AuthResults:
    """The topmost `Authentication-Results` stamped by `authserv_id`; any other is ignored.

    The trusted MTA prepends its header (and should remove forged ones carrying its id, RFC 8601
    section 5), so the topmost header with its id is its own verdict on this mail.
    """
    wanted = authserv_id.strip().casefold()
    values = header_values(raw, ("authentication-results",))["authentication-results"]
    for value in values[:MAX_RESULTS_HEADERS]:
        try:
            header = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception:  # authres raises its own syntax errors on hostile text
            continue
        if str(header.authserv_id).strip().casefold() == wanted:
            return _from_header(header, authserv_id)
    return AuthResults(detail=f"no Authentication-Results header of {authserv_id}")


def _from_header(header: authres.AuthenticationResultsHeader, authserv_id: str) -> AuthResults:
    verdicts: dict[str, list[str]] = {"dkim": [], "spf": [], "dmarc": []}
    domains: list[str] = []
    dmarc_domain = ""
    for result in header.results:
        method, value = str(result.method).lower(), str(result.result).lower()
        if method not in verdicts:
            continue
        verdicts[method].append(value)
        if method == "dkim" and value == PASS:
            domain = _property(result.properties, "header", "d")
            if domain and domain not in domains:
                domains.append(domain)
        if method == "dmarc" and not dmarc_domain:
            dmarc_domain = _property(result.properties, "header", "from")
    shown = "; ".join(f"{m}={','.join(v)}" for m, v in verdicts.items() if v)
    return AuthResults(
        dkim=_best(verdicts["dkim"]),
        spf=_best(verdicts["spf"]),
        dmarc=_best(verdicts["dmarc"]),
        dkim_domains=tuple(domains),
        dmarc_domain=dmarc_domain,
        source=f"Authentication-Results of {authserv_id}",
        detail=shown or "no dkim, spf or dmarc result",
    )


def _property(properties: Iterable, kind: str, name: str) -> str:
    for prop in properties:
        if str(prop.type).lower() == kind and str(prop.name).lower() == name:
            return str(prop.value).strip().lower()
    return ""


_RANK = {PASS: 0, TEMPERROR: 1, FAIL: 2, PERMERROR: 3}


def _best(results: list[str]) -> str:
    """One word for several results of a method: a pass wins, then a temporary failure."""
    if not results:
        return NONE
    return min(results, key=lambda r: _RANK.get(r, len(_RANK)))


# --------------------------------------------------------------------------- in-process check


@dataclass
class _Lookups:
    """dkimpy's DNS hook: answers through our resolver and remembers what failed."""

    resolver: TxtResolver
    timeout: float
    failures: list[str] = field(default_factory=list)

    def txt(self, name: bytes | str, timeout: float = 5.0) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            return self.resolver(text.rstrip("."), self.timeout)
        except Exception as exc:  # DnsFailure, or any error of a resolver: not an answer
            self.failures.append(f"{text.rstrip('.')}: {exc or type(exc).__name__}")
            raise dkim.DnsTimeoutError(str(exc)) from None


def verify(raw: bytes | bytearray, resolver: TxtResolver, timeout: float) -> AuthResults:
    """DKIM (every signature, up to MAX_SIGNATURES) and DMARC's DKIM alignment, in-process.

    SPF is not checked here: it needs the connecting client's address, which mail fetched over
    IMAP or piped to `gateway ingest` does not have; `auth.spf` stays "none" (use
    `trusted_header` when SPF matters). DMARC passes when the From domain publishes a DMARC
    record and a passing signature's `d=` is that domain, a parent or a subdomain of it.
    """
    data = bytes(raw)
    lookups = _Lookups(resolver, timeout)
    results: list[tuple[str, str]] = []
    count = len(header_values(data, ("dkim-signature",))["dkim-signature"])
    for index in range(min(count, MAX_SIGNATURES)):
        lookups.failures.clear()
        results.append(_verify_one(data, index, lookups))
    passing = tuple(dict.fromkeys(domain for domain, result in results if result == PASS))
    verdicts = [result.partition(":")[0] for _, result in results]
    from_domain = _from_domain(data)
    dmarc, dmarc_detail = _dmarc(from_domain, passing, lookups)
    shown = ", ".join(f"{result} (d={domain or '?'})" for domain, result in results)
    return AuthResults(
        dkim=_best(verdicts),
        dmarc=dmarc,
        dkim_domains=passing,
        dmarc_domain=from_domain,
        source="dkimpy",
        detail=f"dkim: {shown or 'no signature'}; dmarc: {dmarc_detail}",
        unsettled=TEMPERROR in verdicts,
    )


def _verify_one(data: bytes, index: int, lookups: _Lookups) -> tuple[str, str]:
    """(d= domain, result) of one signature."""
    try:
        checker = dkim.DKIM(data, logger=_QUIET, timeout=lookups.timeout)
    except dkim.DKIMException:  # a header block dkimpy cannot parse
        return "", PERMERROR
    try:
        ok: bool | None = checker.verify(index, dnsfunc=lookups.txt)
    except dkim.ValidationError as exc:  # the body was changed after signing, or bad tags
        ok = False if "body hash" in str(exc) else None
    except dkim.DKIMException:
        ok = None  # malformed signature or key
    domain = (checker.domain or b"").decode("ascii", "replace").lower()
    if lookups.failures:
        return domain, TEMPERROR
    if ok is None:
        return domain, PERMERROR
    if ok and not _covers_what_rules_read(data, checker):
        return domain, f"{FAIL}: signature does not cover all of From, Subject and the body"
    return domain, PASS if ok else FAIL


RULE_HEADERS = ("from", "subject")  # the signed headers the rules and keys depend on


def _covers_what_rules_read(data: bytes, checker: dkim.DKIM) -> bool:
    """A valid signature still proves nothing about text it does not cover: an `l=` body
    length lets anyone append to the body, and a Subject or From added above the signed one
    (not over-signed in `h=`) is the one the rules would read. Such a signature is a fail."""
    fields = checker.signature_fields or {}
    if b"l" in fields:
        return False
    signed = list(checker.include_headers or ())
    present = header_values(data, RULE_HEADERS)
    return all(0 < len(present[name]) <= signed.count(name.encode()) for name in RULE_HEADERS)


def _from_domain(data: bytes) -> str:
    address = header_address(header_values(data, ("from",))["from"])
    return address.rpartition("@")[2].lower() if address else ""


def _dmarc(from_domain: str, passing: tuple[str, ...], lookups: _Lookups) -> tuple[str, str]:
    """DMARC's DKIM half: (result, detail). Without a record the result is 'none'."""
    if not from_domain:
        return NONE, "no single From address"
    lookups.failures.clear()
    record = None
    for domain in _dmarc_candidates(from_domain):
        try:
            record = lookups.txt(f"_dmarc.{domain}")
        except dkim.DnsTimeoutError:
            return TEMPERROR, f"DNS lookup failed ({'; '.join(lookups.failures)})"
        if record is not None and record.lstrip().lower().startswith(b"v=dmarc1"):
            break
        record = None
    if record is None:
        return NONE, f"no DMARC record for {from_domain}"
    if any(_aligned(from_domain, domain) for domain in passing):
        return PASS, f"aligned DKIM pass for {from_domain}"
    return FAIL, f"no passing DKIM signature aligned with {from_domain}"


def _dmarc_candidates(domain: str) -> list[str]:
    """Where DMARC's policy is looked up (RFC 7489 section 6.6.3): the From domain, then its
    organisational domain (one label below its public suffix), if that is another name."""
    organisational = organisational_domain(domain)
    return [domain] if organisational in ("", domain) else [domain, organisational]


def organisational_domain(domain: str) -> str:
    """The registered domain by the Public Suffix List (`mail.example.co.uk` ->
    `example.co.uk`); "" for a public suffix itself (`co.uk`), which no one owns."""
    return _public_suffixes().privatesuffix(domain.lower().rstrip(".")) or ""


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The list bundled with `publicsuffixlist` (never fetched at run time), parsed once."""
    return PublicSuffixList()


def _aligned(from_domain: str, signer: str) -> bool:
    """Relaxed alignment (RFC 7489 section 3.1.1): the same organisational domain. A signer
    that is a public suffix aligns with nothing."""
    if signer == from_domain:
        return True
    organisational = organisational_domain(signer)
    return organisational != "" and organisational == organisational_domain(from_domain)


class _Quiet:
    """dkimpy logs every failed signature at error level: the reason carries it instead."""

    def debug(self, *args: object) -> None: ...

    info = warning = error = debug


_QUIET = _Quiet()


# --------------------------------------------------------------------------- real DNS


class DnsTxtResolver:
    """TXT lookups with dnspython under a timeout, cached briefly (thread-safe).

    NXDOMAIN and "no TXT record" are answers (None); a timeout, SERVFAIL or an unreachable
    nameserver raise DnsFailure. Answers are cached for `ttl` seconds. A failure is remembered
    for `failure_ttl` seconds and repeated without asking again: during a DNS outage a batch of
    mail from one sender costs one timeout, not one per mail, so other mail is not held up."""

    def __init__(
        self,
        ttl: float = 300.0,
        failure_ttl: float = 30.0,
        max_entries: int = 1000,
        lookup: TxtResolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl, self.failure_ttl, self.max_entries = ttl, failure_ttl, max_entries
        self.lookup = lookup or _resolve_txt
        self.clock = clock
        self._cache: dict[str, tuple[float, bytes | DnsFailure | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, timeout: float) -> bytes | None:
        key = name.lower()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] > self.clock():
            if isinstance(cached[1], DnsFailure):
                raise cached[1]
            return cached[1]
        try:
            answer: bytes | DnsFailure | None = self.lookup(name, timeout)
        except DnsFailure as exc:
            answer = exc
        ttl = self.failure_ttl if isinstance(answer, DnsFailure) else self.ttl
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[key] = (self.clock() + ttl, answer)
        if isinstance(answer, DnsFailure):
            raise answer
        return answer


def _resolve_txt(name: str, timeout: float) -> bytes | None:
    import dns.exception
    import dns.resolver

    try:
        answer = dns.resolver.resolve(name, "TXT", lifetime=timeout, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.DNSException as exc:  # Timeout, NoNameservers (SERVFAIL), ...
        raise DnsFailure(f"{type(exc).__name__}: {exc}") from None
    for record in answer:
        return b"".join(record.strings)
    return None
