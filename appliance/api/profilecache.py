"""A short per-worker cache of what a read of the caller's own user row produced (/api/protected).

Keyed by (user id, token generation): every change that must take effect at once
(role change, disable, password change, logout-all) bumps the user's generation,
so a token issued after it looks under a new key and reads the row again, and
the tokens issued before it are refused by the revocation check that runs before
any responder. Revoking one token (logout) is that check's job too. What the key
does not see (a profile edit, a new login's count) is at most `ttl` seconds old.
Entries live `ttl` seconds; the cache is emptied when it holds `max_entries`.
Time is a parameter (clock) so tests need not sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

DEFAULT_TTL = 1.0  # seconds
DEFAULT_MAX_ENTRIES = 10000


class ProfileCache:
    """get(key) -> value or None; put(key, value). Safe to share between waitress threads (dict operations only)."""

    def __init__(self, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._entries: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    def put(self, key: Hashable, value: Any) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # many users at once: start over rather than track ages
        self._entries[key] = (self.clock() + self.ttl, value)

    def clear(self) -> None:
        self._entries.clear()
