"""Incident-key normalisation: replies, forwards and tagged subjects of one case meet."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import regex

from gateway.rules.model import MAX_KEY

# Reply/forward markers in many mail clients' languages, with optional counters ("Re[2]:",
# "Re(2):"), a space before the colon ("Re :") and the full-width colon ("回复：").
_REPLY_WORDS = r"(?:re|fwd?|aw|wg|sv|vs|antw|tr|rif|回复|回覆|答复|转发|轉寄|轉發)"
_REPLY_PREFIX = _REPLY_WORDS + r"[ \t]*(?:\[\d+\]|\(\d+\))?[ \t]*[:：]"


@lru_cache(maxsize=64)
def _prefix_pattern(tags: tuple[str, ...]) -> regex.Pattern[str]:
    alternatives = [_REPLY_PREFIX, *(regex.escape(t) for t in tags if t.strip())]
    return regex.compile(r"^(?:" + "|".join(alternatives) + r")\s*", regex.IGNORECASE)


def normalise_key(text: str, tags: tuple[str, ...] | list[str] = ()) -> str:
    """Make replies and forwards of one case produce the same key (see DESIGN 'Incident key').

    Trims, collapses whitespace, strips Re:/Fwd:/... and the operator's [tag] prefixes in any
    order and number, then cuts to 255 characters with a hash suffix so long keys never collide.
    """
    key = " ".join(text.split())
    pattern = _prefix_pattern(tuple(tags))
    while key:
        found = pattern.match(key)
        if found is None or not found.end():
            break
        key = key[found.end() :]
    key = key.strip()
    if len(key) > MAX_KEY:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
        key = key[: MAX_KEY - 1 - len(digest)] + "~" + digest
    return key
