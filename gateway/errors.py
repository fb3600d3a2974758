"""The gateway's exception tree.

    GatewayError
    ├── ConfigError          invalid config.toml (file and key named)
    ├── RuleError            invalid parsing-rule file (file and line named)
    ├── RuleEvaluationError  a rule could not be evaluated for one message (regex timeout,
    │                        template error): the message is quarantined with the reason
    ├── ThemeError           invalid or failing notification theme (file and line named)
    ├── StoreError           the store could not commit (transient: SMTP 451, ingest exit 75)
    │   └── StoreMissing     a read-only command found no store to read (exit 1)
    └── DeliveryError        an outgoing call failed
        ├── TemporaryDeliveryError   retry later (429, 5xx, timeout, connection error)
        └── RejectedDeliveryError    never retry (400): dead letter

The SMTP listener maps these to reply codes and the CLI to exit codes; nothing else catches
them broadly.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One validation finding, located as precisely as we can (file, line, key)."""

    file: str
    message: str
    line: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key:
            where = f"{where}: [{self.key}]"
        return f"{where}: {self.message}"


class ProblemsError(GatewayError):
    """An error carrying one or more located problems."""

    def __init__(self, problems: list[Problem] | Problem) -> None:
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(ProblemsError):
    """config.toml is invalid; every problem names the file and the key."""


class RuleError(ProblemsError):
    """A parsing-rule file is invalid; every problem names the file and the line."""


class ThemeError(ProblemsError):
    """A notification theme is invalid or failed to render."""


class RuleEvaluationError(GatewayError):
    """A rule failed on one message (regex timeout, template error): quarantine it."""

    def __init__(self, rule: str, reason: str) -> None:
        self.rule = rule
        self.reason = reason
        super().__init__(f"rule {rule!r}: {reason}")


class StoreError(GatewayError):
    """The store could not durably commit; the caller must answer 'try again later'."""


class StoreUnavailable(StoreError):
    """Not the statement's fault: the database cannot be reached, or it asked to try again
    (a deadlock it broke, a lost connection). Whatever was being decided stays pending."""


class StoreMissing(StoreError):
    """There is no store at the configured place yet, and a read-only command cannot create
    one: usually the wrong --config or data_dir."""


class DeliveryError(GatewayError):
    """An outgoing delivery (PagerDuty event, mail) failed."""


class TemporaryDeliveryError(DeliveryError):
    """Worth retrying later; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RejectedDeliveryError(DeliveryError):
    """The receiver refused the item for good (e.g. HTTP 400): dead-letter it."""

    def __init__(self, message: str, response: str = "") -> None:
        super().__init__(message)
        self.response = response
