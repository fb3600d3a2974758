"""Incident changes -> `incident_update` mail to the helpdesk, queued in the durable outbox.

Two steps, one per phase of the processor. `render` runs before the write transaction, like
parsing and rules: a theme is operator code of unbounded cost, and while it runs nobody else
(the spool writer above all) may be kept from writing. `queue` runs inside the transaction and
only inserts the rendered mail, so the mail is committed together with the decision that
caused it. A theme that fails to render must not block paging: the failure is logged and
recorded as an event, and the decision still commits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from gateway.config import Config, NotifySettings, OutgoingSettings
from gateway.decide import outgoing_mail
from gateway.errors import ThemeError
from gateway.files import FileSnapshot
from gateway.outcomes import Outcome
from gateway.store import DecisionStore, Incident
from gateway.themes import render as themes

log = logging.getLogger(__name__)

# incident outcome -> the event name services subscribe to in `notify.on`
EVENTS = {
    Outcome.TRIGGERED: "trigger",
    Outcome.DUPLICATE: "duplicate",
    Outcome.ACKNOWLEDGED: "acknowledge",
    Outcome.RESOLVED: "resolve",
}


@dataclass(frozen=True)
class Notification:
    """A rendered helpdesk mail waiting for its decision's transaction, or why it failed."""

    service: str
    incident_key: str
    payload: dict[str, Any] | None  # the outbox payload (envelope + serialized message)
    error: str = ""

    @property
    def order_key(self) -> str:
        return f"mail:{self.service}:{self.incident_key}"


@dataclass(frozen=True)
class HelpdeskNotifier:
    """Renders notification mail for services that configured `notify`."""

    themes: themes.Themes
    outgoing: OutgoingSettings

    def render(
        self, notify: NotifySettings, outcome: str, incident: Incident
    ) -> Notification | None:
        """The mail for `outcome` if the service subscribed to it (no database access)."""
        event = EVENTS.get(outcome)
        if event is None or event not in notify.on:
            return None
        return self.render_event(notify.theme, notify.to, event, incident)

    def render_event(
        self,
        theme: str,
        to: tuple[str, ...],
        event: str,
        incident: Incident,
        *,
        note: str = "",
        agent: str = "",
    ) -> Notification:
        """`theme` about `event` (a decision's or a PagerDuty webhook's) to `to`."""
        service, key = incident.service, incident.incident_key
        if not to:
            return Notification(service, key, None, "notify.to lists no recipient")
        from_addr = self.outgoing.from_addr
        context = themes.incident_context(
            event, incident, to=to, from_addr=from_addr, note=note, agent=agent
        )
        try:
            msg = self.themes.render(theme, context, default_from=from_addr)
        except ThemeError as exc:
            return Notification(service, key, None, str(exc))
        sender = outgoing_mail.envelope_sender(from_addr)
        return Notification(service, key, outgoing_mail.mail_payload(msg, sender, list(to)))


def queue(store: DecisionStore, notification: Notification, job: int | None) -> int | None:
    """Inside the decision's transaction: outbox the mail (or record why there is none)."""
    if notification.payload is None:
        log.error("notification for %s not sent: %s", notification.incident_key, notification.error)
        store.log_event(
            "notify_failed",
            service=notification.service,
            incident_key=notification.incident_key,
            detail=notification.error,
        )
        return None
    return outgoing_mail.queue_payload(
        store,
        notification.payload,
        service=notification.service,
        order_key=notification.order_key,
        job=job,
    )


def build_helpdesk_notifier(
    config: Config, *, files: FileSnapshot | None = None
) -> HelpdeskNotifier | None:
    """A HelpdeskNotifier when some service wants notifications; ThemeError if the themes are
    broken. `files`: the generation's recorded files (see `gateway.files`)."""
    if config.outgoing is None:
        return None
    if not any(s.notify for s in config.services) and not config.pagerduty.webhook_secret:
        return None  # reverse rules need webhooks; without them nothing here sends mail
    compiled = themes.themes_for(config, files=files)
    return HelpdeskNotifier(compiled, config.outgoing)
