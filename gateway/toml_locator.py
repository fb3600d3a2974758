"""Line numbers for parts of a TOML document, so every config and rule-file error says where.

`tomllib` reports no positions for valid documents; this finds them by scanning the source text
(table headers, `key =` lines, items of inline arrays and of `[[array]]` tables).
"""

from __future__ import annotations

import bisect
import re

_HEADER_NAME = re.compile(r"^[ \t]*\[(\[)?[ \t]*([A-Za-z0-9_.\"' -]+?)[ \t]*\]\]?[ \t]*(?:#.*)?$")

KeyPath = tuple[str | int, ...]


class TomlLocator:
    """Line numbers (1-based) for parts of a TOML document, found by scanning its text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)
        self.headers: list[tuple[int, str]] = []  # (line index, dotted name)
        for index, line in enumerate(self.lines):
            found = _HEADER_NAME.match(line)
            if found:
                name = re.sub(r"[ \t]*\.[ \t]*", ".", found.group(2)).replace('"', "")
                self.headers.append((index, name.replace("'", "")))

    def span(self, name: str, nth: int = 0) -> tuple[int, int] | None:
        """Line-index span of the nth `[name]`/`[[name]]` table, sub-tables included."""
        starts = [i for i, header in self.headers if header == name]
        if nth >= len(starts):
            return None
        start = starts[nth]
        for index, header in self.headers:
            if index > start and not header.startswith(name + "."):
                return start, index
        return start, len(self.lines)

    def top(self, key: str) -> int | None:
        """Line of a top-level key or table."""
        for index, header in self.headers:
            if header == key or header.startswith(key + "."):
                return index + 1
        end = self.headers[0][0] if self.headers else len(self.lines)
        found = self._key(key, 0, end)
        return None if found is None else found + 1

    def locate(self, span: tuple[int, int] | None, path: KeyPath) -> int | None:
        """Line of a nested key/array item: ('conditions', 0, 'op'), ('details', 'case')."""
        if span is None:
            return self.top(str(path[0])) if path and isinstance(path[0], str) else None
        line, end = span
        array_header: str | None = None
        for part in path:
            if isinstance(part, int):
                line = self._item(line, part, end, array_header)
                continue
            found = self._key(part, line, end)
            array_header = None
            if found is None:
                found, array_header = self._subheader(part, line, end)
            if found is None:
                break
            line = found
            rest = self.lines[line].split("=", 1)[-1].lstrip()
            if array_header is None and rest.startswith("{"):
                end = line + 1  # inline table: nested keys are on this line
        return line + 1

    def _key(self, key: str, start: int, end: int) -> int | None:
        pattern = re.compile(r"(?:^|[\s{,])[\"']?" + re.escape(key) + r"[\"']?\s*=(?!=)")
        for index in range(start, min(end, len(self.lines))):
            line = self.lines[index]
            if not line.lstrip().startswith("#") and pattern.search(line):
                return index
        return None

    def _subheader(self, key: str, start: int, end: int) -> tuple[int | None, str | None]:
        for index, header in self.headers:
            if start <= index < end and header.split(".")[-1] == key:
                return index, header
        return None, None

    def _item(self, line: int, nth: int, end: int, array_header: str | None) -> int:
        """Line of the nth item of an array: `[[x.y]]` headers or an inline `[...]`."""
        if array_header is not None:
            found = [i for i, h in self.headers if h == array_header and line <= i < end]
            return found[nth] if nth < len(found) else line
        text = self.text
        pos = text.find("[", text.find("=", self.starts[line]))
        if pos < 0:
            return line
        return self._scan_items(pos, nth, line)

    def _scan_items(self, pos: int, nth: int, fallback: int) -> int:
        text, depth, expecting, count = self.text, 0, True, -1
        while pos < len(text):
            char = text[pos]
            if depth == 1 and expecting and char not in " \t\r\n,]#":
                count, expecting = count + 1, False
                if count == nth:
                    return bisect.bisect_right(self.starts, pos) - 1
            if char in "\"'":
                pos = _skip_string(text, pos)
                continue
            if char == "#":
                pos = text.find("\n", pos)
                pos = len(text) if pos < 0 else pos
                continue
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    break
            elif char == "," and depth == 1:
                expecting = True
            pos += 1
        return fallback


def _skip_string(text: str, pos: int) -> int:
    """Index just after the TOML string starting at pos (basic, literal, multi-line)."""
    quote = text[pos]
    if text.startswith(quote * 3, pos):
        end = text.find(quote * 3, pos + 3)
        return len(text) if end < 0 else end + 3
    index = pos + 1
    while index < len(text) and text[index] != "\n":
        if quote == '"' and text[index] == "\\":
            index += 2
            continue
        if text[index] == quote:
            return index + 1
        index += 1
    return index
