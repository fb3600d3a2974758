"""The loop guard: which automatic mail is recorded and not acted on, and why.

Its job is to stop mail loops: auto-replies (out-of-office, vacation), bounces, and the
gateway's own outgoing mail coming back. Those are always ignored. Mail marked
`Auto-Submitted: auto-generated` / `auto-notified` is different (RFC 3834 §5, RFC 5436): a
notification from an automatic process — cron, Zendesk, Jira, ServiceNow — which is exactly
what some services exist to page on. Whether it is acted on is the service's `loop_guard`
setting: "strict" (the default, and the behaviour before the setting existed) ignores it,
"replies" passes it to the rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config import DEFAULT_INSTALLATION_ID, ServiceSettings
from gateway.mail.parse import ParsedMail

# Stamped by gateway.themes.render on every mail the gateway sends on its own account.
LOOP_HEADER = "X-Gateway-Loop"


@dataclass(frozen=True)
class LoopVerdict:
    """What the loop guard found in a mail and what it decided; `signal` '' means nothing."""

    ignored: bool
    signal: str = ""  # e.g. 'Auto-Submitted: auto-generated'
    kind: str = ""  # own mail | auto-reply | bounce | notification
    setting: str = ""  # the service's loop_guard, when it decided

    def describe(self) -> str:
        """One line for operators: the signal, and whether the setting or a rule decided."""
        if not self.signal:
            return ""
        if self.kind == "notification":
            if self.ignored:
                return (
                    f"{self.signal}: a notification, ignored because loop_guard ="
                    f' "{self.setting}" (loop_guard = "replies" would pass it to the rules)'
                )
            return (
                f"{self.signal}: a notification, passed to the rules because loop_guard ="
                f' "{self.setting}"'
            )
        return f"{self.signal}: {self.kind}, always ignored (whatever loop_guard says)"


NOTHING = LoopVerdict(ignored=False)


def loop_verdict(
    mail: ParsedMail, *, mode: str = "strict", installation_id: str = DEFAULT_INSTALLATION_ID
) -> LoopVerdict:
    """The verdict for `mail` under a service's `loop_guard` mode ("strict" | "replies")."""
    if installation_id in mail.gateway_loop:
        signal = f"{LOOP_HEADER}: {installation_id}"
        return LoopVerdict(True, signal, "the gateway's own mail")
    if mail.auto_reply_reason:
        return LoopVerdict(True, mail.auto_reply_reason, "an auto-reply")
    if mail.bounce_reason:
        return LoopVerdict(True, mail.bounce_reason, "a bounce")
    if mail.notification_reason:
        return LoopVerdict(mode != "replies", mail.notification_reason, "notification", mode)
    return NOTHING


# shipped packs whose senders mark every notification Auto-Submitted: auto-generated
AUTO_GENERATED_PACKS = {
    "zendesk.toml": "Zendesk",
    "servicenow.toml": "ServiceNow",
    "jira_service_management.toml": "Jira Data Center",
    "cron.toml": "cronie and OpenBSD cron",
}


def strict_pack_notices(services: Iterable[ServiceSettings]) -> list[str]:
    """`gateway check` notes: a strict service on a pack whose mail the guard would swallow."""
    notices = []
    for service in services:
        if service.loop_guard != "strict":
            continue
        for path in service.rules:
            sender = AUTO_GENERATED_PACKS.get(path.name)
            if sender:
                notices.append(
                    f'service {service.name!r} uses {path.name} with loop_guard = "strict":'
                    f" {sender} mark their notifications Auto-Submitted: auto-generated, which"
                    ' will be loop_ignored; set loop_guard = "replies" to act on them'
                )
    return notices
