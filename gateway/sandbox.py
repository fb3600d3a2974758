"""Jinja for operator templates (rule summaries and details, notification themes), with budgets.

Jinja's immutable sandbox stops templates from changing what they are given, but it has no
time or memory limit: `{% for i in range(100000) %}{% for j in range(100000) %}` runs for hours
and `{{ 'x' * 10**9 }}` allocates a gigabyte (at compile time, through constant folding). A rule
template runs for every matching mail, so either would stall paging for everyone.

`BudgetedSandbox` bounds both:

* size: the operators and calls that can multiply a value (`*`, `**`, `%`, `+`, padding and
  formatting methods and filters, namespace attributes) refuse a result larger than
  `max_chars` *before* building it; intercepted operators are also never constant-folded, so
  compiling is cheap whatever the source says; the rendered output is cut off at `max_chars`.
* time: templates that can loop (`for`, macros, call blocks) render under a line tracer that
  raises once `max_seconds` have passed. Straight-line templates cannot run long with bounded
  values and skip the tracer.

Exceeding a budget raises `BudgetExceeded` (a `SecurityError`), which callers report like any
other template failure: a rule quarantines the mail with the reason, a theme names file:line.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

from jinja2 import Template, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 1_000_000  # any one value, and the whole output
MAX_SECONDS = 0.5
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width of a million characters or more
_PADDING_METHODS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"}
)
_LOOPS = (nodes.For, nodes.Macro, nodes.CallBlock)


class BudgetExceeded(SecurityError):
    """A template needed more time or characters than its budget allows."""


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox with a size budget on values and a time budget on rendering."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(
        self, *, max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS, **options: Any
    ) -> None:
        super().__init__(**options)
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        self.globals.pop("lipsum", None)  # lipsum(n=10**9): text generation on demand
        self.globals["namespace"] = _bounded_namespace(max_chars)
        for name in ("center", "indent", "wordwrap", "format", "replace", "join", "list"):
            self.filters[name] = _bounded_filter(self.filters[name], name, max_chars)

    # -- size --------------------------------------------------------------------------------

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self._check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        return self.checked(result, f"the result of {operator!r}")

    def _check_binop(self, operator: str, left: Any, right: Any) -> None:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    self._limit(len(seq) * max(times, 0), "'*' repetition")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            # the result has about right * log2(left) bits; keep it printable within budget
            self._limit(abs(right) * max(abs(left), 2).bit_length() // 3, "'**' power")
        elif operator == "%" and isinstance(left, str):
            if _BIG_WIDTH.search(left):
                raise BudgetExceeded(f"format width over {self.max_chars} characters")
        elif operator == "+" and isinstance(left, str | list | tuple):
            self._limit(len(left) + _length(right), "'+' concatenation")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        if name in _PADDING_METHODS:
            __self._check_arguments(name, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return __self.checked(result, f"the result of {name or 'a call'}()")

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._check_format_string(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._check_format_string(obj, argument)
        return super().getitem(obj, argument)

    def _check_format_string(self, obj: Any, attribute: Any) -> None:
        """'{:>999999999}'.format(...): the width is in the string the method is bound to."""
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            self._check_arguments(attribute, (obj,), {})

    def _check_arguments(self, name: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and value > self.max_chars:
                raise BudgetExceeded(f"{name}() width {value} over {self.max_chars} characters")
            if isinstance(value, str) and _BIG_WIDTH.search(value):
                raise BudgetExceeded(f"{name}() format width over {self.max_chars} characters")

    def _limit(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise BudgetExceeded(
                f"{what} would make {size:,} characters (limit {self.max_chars:,})"
            )

    def checked(self, value: Any, what: str) -> Any:
        """`value`, unless it is a string or sequence beyond the size budget."""
        if isinstance(value, str | list | tuple) and len(value) > self.max_chars:
            raise BudgetExceeded(f"{what} has {len(value):,} items (limit {self.max_chars:,})")
        return value

    # -- time ----------------------------------------------------------------------------------

    def render(self, template: Template, context: Mapping[str, Any]) -> str:
        """Render `template` (compiled by this environment) within both budgets."""
        if not getattr(template, "_gateway_may_loop", True):
            return self._collect(template.generate(context))
        with _Deadline(self.max_seconds):
            return self._collect(template.generate(context))

    def _collect(self, chunks: Iterator[str]) -> str:
        out: list[str] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.max_chars:
                raise BudgetExceeded(f"output over {self.max_chars:,} characters")
            out.append(chunk)
        return "".join(out)

    def from_string(self, source: str, *args: Any, **kwargs: Any) -> Template:  # type: ignore[override]
        template = super().from_string(source, *args, **kwargs)
        template._gateway_may_loop = may_loop(self, source)  # type: ignore[attr-defined]
        return template


def may_loop(env: BudgetedSandbox, source: str) -> bool:
    """Whether a template can run longer than its length suggests (loops, macros)."""
    try:
        return any(True for _ in env.parse(source).find_all(_LOOPS))
    except Exception:  # unparsable: compiling reports it; assume the worst meanwhile
        return True


class _Deadline:
    """A line tracer on the current thread that raises once the time is up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = 0.0
        self._previous: Callable | None = None

    def __enter__(self) -> _Deadline:
        self.deadline = time.monotonic() + self.seconds
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)

    def _on_call(self, frame: FrameType, event: str, arg: Any) -> Callable | None:
        self._check()
        return self._on_line

    def _on_line(self, frame: FrameType, event: str, arg: Any) -> Callable | None:
        self._check()
        return self._on_line

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            sys.settrace(self._previous)
            raise BudgetExceeded(f"rendering took longer than {self.seconds:g} s")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


def _bounded_namespace(max_chars: int) -> type[Namespace]:
    class BoundedNamespace(Namespace):
        """`{% set ns.x = ns.x ~ ns.x %}` in a loop doubles a value; cap what it can hold."""

        def __setitem__(self, name: str, value: Any) -> None:
            if isinstance(value, str | list | tuple) and len(value) > max_chars:
                raise BudgetExceeded(f"namespace value over {max_chars:,} characters")
            super().__setitem__(name, value)

    return BoundedNamespace


def _bounded_filter(original: Callable, name: str, max_chars: int) -> Callable:
    """A filter that refuses huge widths up front and huge results after."""

    skip = 1 if hasattr(original, "jinja_pass_arg") else 0  # the context Jinja passes first

    def bounded(*args: Any, **kwargs: Any) -> Any:
        value, *rest = args[skip:]
        for arg in (*rest, *kwargs.values()):
            if isinstance(arg, int) and arg > max_chars:
                raise BudgetExceeded(f"{name} filter width {arg} over {max_chars} characters")
        if name == "replace" and len(rest) >= 2 and isinstance(value, str):
            text, old, new = value, str(rest[0]), str(rest[1])
            grown = len(text) + text.count(old) * max(len(new) - len(old), 0) if old else 0
            if grown > max_chars:
                raise BudgetExceeded(f"replace filter would make {grown:,} characters")
        result = original(*args, **kwargs)
        if isinstance(result, str | list | tuple) and len(result) > max_chars:
            raise BudgetExceeded(f"{name} filter result over {max_chars:,} characters")
        return result

    for attr in ("jinja_pass_arg",):  # keep @pass_eval_context / @pass_environment markers
        if hasattr(original, attr):
            setattr(bounded, attr, getattr(original, attr))
    bounded.__name__ = getattr(original, "__name__", name)
    return bounded
