"""Parsing rules: the operator's TOML files (`loader`), the compiled `model`, incident `keys`,
sandboxed `templates` and `evaluate`, the per-mail hot path."""

from gateway.rules.evaluate import evaluate
from gateway.rules.keys import normalise_key
from gateway.rules.loader import load_ruleset
from gateway.rules.model import Decision, Rule, Ruleset, TraceStep

__all__ = ["Decision", "Rule", "Ruleset", "TraceStep", "evaluate", "load_ruleset", "normalise_key"]
