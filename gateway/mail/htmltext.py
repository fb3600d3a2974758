"""HTML body -> plain text that `contains`/`matches` rules can read line by line.

Helpdesk notifications are usually HTML-only, with the interesting facts in table rows
('<tr><td>Status:</td><td>New</td></tr>'). Each block element and table row becomes its own
line, the cells of a row are joined by a space, script/style/head are dropped, entities are
unescaped and runs of whitespace (including &nbsp;) collapse to one space.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape

from selectolax.lexbor import LexborHTMLParser

_BR = "\ue000"  # private-use sentinel for a line break, turned into "\n" after collapsing
_WS = re.compile(r"\s+")
# fmt: off
_BLOCKS = frozenset((
    "br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl",
    "dt", "dd", "blockquote", "pre", "hr", "section", "article", "header", "footer", "nav",
    "aside", "main", "address", "center", "form", "fieldset", "figure", "figcaption", "caption",
    "thead", "tbody", "tfoot", "title",
))
# fmt: on
_CELLS = frozenset({"td", "th"})
_DROPPED = ["script", "style", "head", "noscript", "template", "svg", "object"]

# Nesting bound. Fewer '<' than _CHEAP_TAGS cannot nest deep enough to be slow (at most a few
# tens of milliseconds); above that the open elements are counted, and past _MAX_DEPTH the HTML
# goes to the fallback.
_CHEAP_TAGS = 4_000
_MAX_DEPTH = 1_000
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)")
# Elements that never nest: void elements, and those that close their open predecessor.
_FLAT = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr", "p", "li", "dt", "dd", "option", "tr", "td", "th"}
)
_ANY_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)?[^<>]*>?")


def html_to_text(html: str) -> str:
    """Readable text of an HTML body: one line per block/row, cells joined by a space.

    Never raises: HTML the parser cannot handle yields ''. Absurdly nested HTML (the HTML
    parser is quadratic in nesting depth: 150,000 unclosed <div> take minutes) is converted by
    a plain tag-stripping fallback instead.
    """
    if not html.strip():
        return ""
    if html.count("<") > _CHEAP_TAGS and _too_deep(html):
        return _strip_tags(html)
    try:
        tree = LexborHTMLParser(html)
        tree.strip_tags(_DROPPED)
        root = tree.body or tree.root
        if root is None:
            return ""
        chunks = list(_chunks(root))
    except Exception:
        return ""
    flat = _WS.sub(" ", "".join(chunks))
    return "\n".join(line.strip() for line in flat.split(_BR) if line.strip())


def _chunks(root: object) -> Iterator[str]:
    """Text nodes, with a line-break sentinel where a block starts or ends, a space before a cell.

    The traversal has no end-of-element event: a node whose previous sibling is a block starts
    a new line, so '<p>Hello</p>Status: New' gives two lines, not 'HelloStatus: New'.
    """
    for node in root.traverse(include_text=True):  # type: ignore[attr-defined]
        tag = node.tag
        if tag in _BLOCKS:
            yield _BR
        elif tag in _CELLS:
            yield " "
        else:
            prev = node.prev
            if prev is not None and prev.tag in _BLOCKS:
                yield _BR
            if tag == "-text":
                yield node.text_content or ""


def _too_deep(html: str) -> bool:
    """True when the open elements (counted per tag name, closes matched by name) nest deeper
    than _MAX_DEPTH at some point."""
    open_by_name: dict[str, int] = {}
    depth = 0
    for close, name in _TAG.findall(html):
        name = name.lower()
        if name in _FLAT:
            continue
        if not close:
            open_by_name[name] = open_by_name.get(name, 0) + 1
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        elif open_by_name.get(name):
            open_by_name[name] -= 1
            depth -= 1
    return False


def _strip_tags(html: str) -> str:
    """The fallback conversion: block tags break lines, cells add a space, other tags vanish."""

    def replace(m: re.Match[str]) -> str:
        name = (m.group(2) or "").lower()
        if name in _BLOCKS:
            return _BR
        return " " if name in _CELLS else ""

    flat = _WS.sub(" ", unescape(_ANY_TAG.sub(replace, html)))
    return "\n".join(line.strip() for line in flat.split(_BR) if line.strip())
