"""Parsing rules: the operator's TOML files (`loader`), the compiled `model`, incident `keys`,
sandboxed `templates` and `evaluate`, the per-mail hot path."""

from gateway.rules.evaluate import evaluate, evaluate_pagerduty
from gateway.rules.keys import normalise_key
from gateway.rules.loader import load_ruleset
from gateway.rules.model import (
    PAGERDUTY_FIELDS,
    Decision,
    PagerDutyDecision,
    PagerDutyRule,
    Rule,
    Ruleset,
    TraceStep,
)

__all__ = [
    "PAGERDUTY_FIELDS",
    "Decision",
    "PagerDutyDecision",
    "PagerDutyRule",
    "Rule",
    "Ruleset",
    "TraceStep",
    "evaluate",
    "evaluate_pagerduty",
    "load_ruleset",
    "normalise_key",
]
