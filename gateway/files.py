"""The files a configuration was compiled from, as the bytes that were read.

`gateway serve` validates config.toml, the rule files and the themes in its main process and
hands the worker child *the bytes it validated*: parent and child never run different versions
of a file, and a worker that restarts after a refused reload never re-reads the refused file.
The loaders (config, rules, themes) read through a `FileSnapshot`:

* live (the default): reads the disk and records what it read: each file's bytes, each
  directory listing, each "is this a file" answer;
* frozen (`frozen()`, what the worker gets): answers from the record only; a path that was not
  recorded does not exist. The same loader code then follows the same paths to the same bytes.

Text is decoded as `Path.read_text` decodes it (UTF-8, universal newlines), so error line
numbers agree whichever way a file was read.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class FileSnapshot:
    """Recorded reads; picklable, so a frozen copy travels over a pipe."""

    contents: dict[str, bytes] = field(default_factory=dict)
    listings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # files probed, content not read (TLS keys)
    live: bool = True

    def frozen(self) -> FileSnapshot:
        """A copy that never touches the disk."""
        return replace(
            self,
            contents=dict(self.contents),
            listings=dict(self.listings),
            present=set(self.present),
            live=False,
        )

    def read_bytes(self, path: Path) -> bytes:
        key = str(path)
        if key in self.contents:
            return self.contents[key]
        if not self.live:
            raise FileNotFoundError(errno.ENOENT, "not part of this configuration", key)
        data = self.contents[key] = Path(path).read_bytes()
        return data

    def read_text(self, path: Path) -> str:
        """Like `Path.read_text(encoding="utf-8")`: UnicodeDecodeError, universal newlines."""
        text = self.read_bytes(path).decode("utf-8")
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def is_file(self, path: Path) -> bool:
        key = str(path)
        if key in self.contents or key in self.present:
            return True
        if not self.live or not Path(path).is_file():
            return False
        self.present.add(key)
        return True

    def is_dir(self, path: Path) -> bool:
        key = str(path)
        if key in self.listings:
            return True
        if not self.live or not Path(path).is_dir():
            return False
        # unreadable: `iterdir` raises the error when someone needs the listing
        with contextlib.suppress(OSError):
            self.listings[key] = tuple(sorted(os.listdir(path)))
        return True

    def exists(self, path: Path) -> bool:
        return self.is_file(path) or self.is_dir(path)

    def iterdir(self, path: Path) -> list[Path]:
        """The directory's entries, sorted by name."""
        key = str(path)
        if key not in self.listings:
            if not self.live:
                raise FileNotFoundError(errno.ENOENT, "not part of this configuration", key)
            self.listings[key] = tuple(sorted(os.listdir(path)))
        return [Path(path) / name for name in self.listings[key]]
