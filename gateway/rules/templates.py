"""Rule templates (summary, severity, details, links): immutable sandboxed Jinja with time and
size budgets (`gateway.sandbox`), compiled once."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template

from gateway.errors import RuleEvaluationError
from gateway.sandbox import BudgetedSandbox

ENV = BudgetedSandbox(undefined=StrictUndefined, autoescape=False)


def is_template(text: str) -> bool:
    """A value is a Jinja template only if it contains Jinja markup; literals skip rendering."""
    return "{{" in text or "{%" in text or "{#" in text


@lru_cache(maxsize=8192)
def compile_template(source: str) -> Template:
    """Compile once per distinct source; rules re-use the compiled template on every message."""
    return ENV.from_string(source)


def render(source: str, context: Mapping[str, Any], rule: str, what: str) -> str:
    """Render a (possibly literal) template; any failure is a RuleEvaluationError."""
    if not is_template(source):
        return source
    try:
        return ENV.render(compile_template(source), context)
    except Exception as exc:  # operator template code: any failure quarantines the message
        raise RuleEvaluationError(rule, f"{what} template failed: {exc}") from None
