"""Incident changes -> `incident_update` mail to the helpdesk, queued in the durable outbox.

Runs inside the processor's transaction, so the mail is committed together with the decision
that caused it. A theme that fails to render must not block paging: it is logged and recorded
as an event, and the decision still commits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.config import Config, NotifySettings, OutgoingSettings
from gateway.decide import outgoing_mail
from gateway.errors import ThemeError
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
class HelpdeskNotifier:
    """Renders and queues notification mail for services that configured `notify`."""

    themes: themes.Themes
    outgoing: OutgoingSettings

    def queue(
        self,
        store: DecisionStore,
        notify: NotifySettings,
        outcome: str,
        incident: Incident,
        job: int,
    ) -> int | None:
        """Queue the mail if `outcome` is one the service subscribed to; returns the item id."""
        event = EVENTS.get(outcome)
        if event is None or event not in notify.on:
            return None
        context = themes.incident_context(
            event, incident, to=notify.to, from_addr=self.outgoing.from_addr
        )
        try:
            msg = self.themes.render(notify.theme, context, default_from=self.outgoing.from_addr)
        except ThemeError as exc:
            log.error("notification for %s not sent: %s", incident.incident_key, exc)
            store.log_event(
                "notify_failed",
                service=incident.service,
                incident_key=incident.incident_key,
                detail=str(exc),
            )
            return None
        return outgoing_mail.queue_mail(
            store,
            msg,
            mail_from=outgoing_mail.envelope_sender(self.outgoing.from_addr),
            rcpt_tos=list(notify.to),
            service=incident.service,
            order_key=f"mail:{incident.service}:{incident.incident_key}",
            job=job,
        )


def build_helpdesk_notifier(config: Config) -> HelpdeskNotifier | None:
    """A HelpdeskNotifier when some service wants notifications; ThemeError if the themes are broken."""
    if config.outgoing is None or not any(s.notify for s in config.services):
        return None
    return HelpdeskNotifier(themes.Themes(config.gateway.templates_dir), config.outgoing)
