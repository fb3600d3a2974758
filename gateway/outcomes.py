"""What happened to one mail for one service, as stored on its job and shown everywhere.

One enum, so the processor, the store's reports, the status page, `/metrics` and the CLI
agree on the words; values are the strings stored in the database.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    TRIGGERED = "triggered"
    DUPLICATE = "trigger_duplicate"  # a trigger for an open key: counted, coalesced if it can be
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    ACK_NO_INCIDENT = "acknowledge_no_open_incident"
    RESOLVE_NO_INCIDENT = "resolve_no_open_incident"
    DISCARDED = "discarded"  # a rule said discard
    UNMATCHED = "unmatched"  # no rule matched; kept and visible
    FILTERED = "filtered"  # did not pass the service's [filter]; kept and visible, never sent
    QUARANTINED = "quarantined"  # could not be decided (regex timeout, template error, ...)
    LOOP_IGNORED = "loop_ignored"  # auto-reply or bounce
    SENDER_REFUSED = "sender_not_allowed"  # fails the service's allowed_senders; kept, visible
    UNAUTHENTICATED = "unauthenticated"  # fails require_authentication; kept, visible
    MAINTENANCE = "maintenance_suppressed"  # a trigger during a suppressing maintenance window


NON_ACTIONS = frozenset(
    {
        Outcome.DISCARDED,
        Outcome.UNMATCHED,
        Outcome.FILTERED,
        Outcome.QUARANTINED,
        Outcome.LOOP_IGNORED,
        Outcome.SENDER_REFUSED,
        Outcome.UNAUTHENTICATED,
        Outcome.MAINTENANCE,
    }
)
