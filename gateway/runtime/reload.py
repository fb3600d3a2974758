"""Hot reload: SIGHUP or a changed config, rule file or theme -> validate -> swap, or keep.

The reload runs exactly what `gateway check` runs (`load_generation`). A new version that fails is
refused with its file:line problems logged and the last good one keeps running; nothing that
is in flight (SMTP sessions, outbox deliveries, the processor's batch) is interrupted. Settings
that only a new process can apply (listen addresses, TLS, IMAP accounts, ...) are logged as
"restart required" and keep their running value.

Each accepted version is a numbered *generation* (1 at start) that remembers the exact bytes it
was compiled from (`gateway.files`). The worker child gets those bytes over its pipe
(`GenerationFiles`) and compiles them with the same `load_generation`: it never reads config,
rules or themes from disk, so it runs exactly what the parent validated, and a worker that
restarts gets the last good generation, whatever the files on disk say by then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.config import Config, load_config
from gateway.decide import heartbeats
from gateway.decide.pagerduty_side import reverse_rule_problems
from gateway.decide.processor import load_services
from gateway.decide.verdicts import ServiceRuntime
from gateway.errors import ConfigError, Problem, ProblemsError, RuleError, ThemeError
from gateway.files import FileSnapshot

log = logging.getLogger(__name__)

POLL_SECONDS = 1.5
MAX_WATCHED_FILES = 2000  # a templates_dir pointed at / must not make every poll walk the disk

# (what the operator reads, how to get it): changes here need `systemctl restart gateway`
RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("[smtp]", lambda c: c.smtp),
    ("[[imap]]", lambda c: c.imap),
    ("[outgoing] (added or removed)", lambda c: c.outgoing is None),
    ("[web] listen", lambda c: c.web.listen),
    ("[gateway] data_dir", lambda c: c.gateway.data_dir),
    ("[gateway] log_format", lambda c: c.gateway.log_format),
    ("[pagerduty] timeout_seconds", lambda c: c.pagerduty.timeout_seconds),
    ("[pagerduty] max_retry_hours", lambda c: c.pagerduty.max_retry_hours),
    ("[pagerduty] rate_limit_per_minute", lambda c: c.pagerduty.rate_limit_per_minute),
)


@dataclass(frozen=True)
class Refusal:
    """The last refused reload, until one is accepted: what /healthz and the status page show."""

    at: float
    reason: str  # what triggered it: "SIGHUP", "changed: <files>"
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class Generation:
    """A configuration that passed `gateway check`: its compiled rules, the bytes it was
    compiled from, and its number in this `serve` (0 outside one)."""

    config: Config
    services: dict[str, ServiceRuntime]
    files: FileSnapshot
    number: int = 0

    def for_worker(self) -> GenerationFiles:
        return GenerationFiles(self.number, self.config.path, self.files.frozen())


@dataclass(frozen=True)
class GenerationFiles:
    """A generation as it travels to the worker child: its number and its bytes (picklable)."""

    number: int
    config_path: Path
    files: FileSnapshot  # frozen: compiling it never touches the disk


def load_generation(config_path: Path, *, files: FileSnapshot | None = None) -> Generation:
    """Config, every rule file and every theme; raises ConfigError/RuleError/ThemeError."""
    files = FileSnapshot() if files is None else files
    config = load_config(config_path, files=files)
    services = load_services(config.services, files=files, schedules=config.schedules)
    rulesets = {name: runtime.ruleset for name, runtime in services.items()}
    problems = heartbeats.rule_problems(config.heartbeats, rulesets, config.path)
    if problems:
        raise ConfigError(problems)
    text = files.read_text(config.path)  # already read: where a bad heartbeat condition is
    heartbeats.compile_conditions(config.heartbeats, str(config.path), text, config.schedules)
    from gateway.themes import render as themes

    if files.exists(config.gateway.templates_dir) or uses_themes(config):
        problems = themes.check(config.gateway.templates_dir, files=files)
        if problems:
            raise ThemeError(problems)
    problems = reverse_rule_problems(config, services, files)
    if problems:
        raise RuleError(problems)
    return Generation(config, services, files)


def compile_generation(shipped: GenerationFiles) -> Generation:
    """The worker's side: `load_generation` over the shipped bytes only."""
    generation = load_generation(shipped.config_path, files=shipped.files)
    return replace(generation, number=shipped.number)


def uses_themes(config: Config) -> bool:
    """Without these, a missing templates directory is no error: nothing would render."""
    return (
        any(s.notify for s in config.services)
        or bool(config.web.notify_token)
        or bool(config.pagerduty.webhook_secret)
    )


def restart_required(old: Config, new: Config) -> list[str]:
    """The settings that differ but that only a restart applies."""
    return [label for label, get in RESTART_ONLY if get(old) != get(new)]


def watched_files(config: Config) -> Iterator[Path]:
    """config.toml, every rule file (configured or in rules_dir) and every theme file."""
    yield config.path
    for service in config.services:
        yield from service.rules
    if config.gateway.rules_dir.is_dir():
        yield from sorted(config.gateway.rules_dir.glob("*.toml"))
    yield from _files_under(config.gateway.templates_dir)


def _files_under(directory: Path) -> Iterator[Path]:
    count = 0
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            count += 1
            if count > MAX_WATCHED_FILES:
                return
            yield Path(root) / name


Signature = dict[Path, tuple[int, int, int] | None]


def signature(paths: Iterator[Path]) -> Signature:
    """(mtime_ns, size, inode) per file; editors that replace files change the inode."""
    result: Signature = {}
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            result[path] = None
        else:
            result[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return result


class Reloader:
    """Validates and applies new versions; `apply` swaps what the running service holds."""

    def __init__(
        self,
        current: Generation,
        apply: Callable[[Generation], None],
        *,
        on_start: Callable[[], None] = lambda: None,
        on_end: Callable[[], None] = lambda: None,
    ) -> None:
        self.current = current
        self.apply = apply
        self.on_start = on_start
        self.on_end = on_end
        self.reloads = 0
        self.refused = 0
        self.last_refusal: Refusal | None = None
        self._lock = asyncio.Lock()
        self._signature = signature(watched_files(current.config))

    @property
    def config(self) -> Config:
        return self.current.config

    @property
    def generation(self) -> int:
        """The number of the generation running now."""
        return self.current.number

    async def reload(self, reason: str) -> bool:
        """Validate off the loop, then apply; False (and an error log) when refused."""
        async with self._lock:
            self.on_start()
            try:
                return await self._reload(reason)
            finally:
                self._signature = signature(watched_files(self.config))
                self.on_end()

    async def _reload(self, reason: str) -> bool:
        try:
            validated = await asyncio.to_thread(load_generation, self.config.path)
        except ProblemsError as exc:
            self.refused += 1
            self.last_refusal = Refusal(time.time(), reason, tuple(exc.problems))
            log.error(
                "reload (%s) refused, keeping the last good configuration (generation %d):\n%s",
                reason,
                self.generation,
                exc,
            )
            return False
        new = replace(validated, number=self.generation + 1)
        for setting in restart_required(self.config, new.config):
            log.warning("restart required: %s changed; it keeps its running value", setting)
        self.apply(new)
        self.current = new
        self.reloads += 1
        self.last_refusal = None
        rules = sum(len(s.ruleset.rules) for s in new.services.values())
        log.info(
            "reloaded (%s): generation %d, %d service(s), %d rule(s)",
            reason,
            new.number,
            len(new.services),
            rules,
        )
        return True

    def changed(self) -> list[Path]:
        """Files whose signature changed since the last look (or reload)."""
        current = signature(watched_files(self.config))
        old = self._signature
        return sorted(p for p in current.keys() | old.keys() if current.get(p) != old.get(p))

    async def watch(self, stop: asyncio.Event, poll_seconds: float = POLL_SECONDS) -> None:
        """Poll mtimes; a change reloads (inotify would be faster, polling works everywhere)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), poll_seconds)
            except TimeoutError:
                pass
            else:
                return
            files = await asyncio.to_thread(self.changed)
            if files:
                await self.reload(f"changed: {', '.join(str(f) for f in files[:5])}")
