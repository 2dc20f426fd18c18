"""Token revocation: one small interface for writers (API) and readers (balancer, workers).

Every revocation is a row in the append-only `revocation_event` table, which
lives in the shared database and so is cluster-wide:
  kind "jti"        one token (logout of an access token)
  kind "family"     a refresh family and every access token issued with it
  kind "generation" every token of a user issued before generation N
                    (logout-all, password change, account disabled)

Readers on the hot path use `RevocationMirror`: an in-memory copy refreshed by
polling rows with id > last seen (one indexed query, every `interval` seconds,
off the request path), so a check is a few dict lookups and a revocation is
visible everywhere within about one interval. Each entry is kept until the
tokens it revokes have expired (the event's expires_at plus the verifier's
leeway) and then dropped, so a long-running process holds only the revocations
that can still matter, not every logout since it started.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import heapq
import logging
import threading
import time
from typing import Any

import peewee as pw
from playhouse.pool import PooledDatabase

from appliance.db.models import RevocationEvent
from appliance.times import UTC, from_timestamp, utcnow

log = logging.getLogger(__name__)


def _timestamp(value: _dt.datetime) -> float:
    """A naive UTC datetime (as the columns hold) as a unix time."""
    return value.replace(tzinfo=UTC).timestamp()


def revoke_token(jti: str, user_id: int | None, expires_at: _dt.datetime, reason: str = "logout") -> None:
    RevocationEvent.create(kind="jti", value=jti, user_id=user_id, reason=reason, expires_at=expires_at)


def revoke_family(family_id: str, user_id: int | None, expires_at: _dt.datetime, reason: str = "logout") -> None:
    RevocationEvent.create(kind="family", value=family_id, user_id=user_id, reason=reason, expires_at=expires_at)


def revoke_generation(user_id: int, generation: int, expires_at: _dt.datetime, reason: str) -> None:
    """Revoke every token of `user_id` whose gen claim is below `generation`."""
    RevocationEvent.create(
        kind="generation", value=str(user_id), user_id=user_id, generation=generation, reason=reason, expires_at=expires_at
    )


def check(claims: dict[str, Any]) -> str | None:
    """Direct database check (one query); the reason when revoked, else None."""
    E = RevocationEvent
    row = (
        E.select(E.reason)
        .where(
            ((E.kind == "jti") & (E.value == str(claims.get("jti"))))
            | ((E.kind == "family") & (E.value == str(claims.get("fam"))))
            | ((E.kind == "generation") & (E.value == str(claims.get("sub"))) & (E.generation > int(claims.get("gen", 0))))
        )
        .limit(1)
        .first()
    )
    return row.reason if row is not None else None


def purge_expired(now: _dt.datetime | None = None) -> int:
    """Delete events whose tokens have all expired anyway."""
    return RevocationEvent.delete().where(RevocationEvent.expires_at < (now or utcnow())).execute()


class RevocationMirror:
    """In-memory copy of the revocation log; `is_revoked` is cheap and safe from any thread.

    `leeway` is the clock skew the token verifier allows past exp: an entry is
    dropped only once its tokens are refused as expired anyway. The default is
    the largest leeway the config accepts, so a reader that is not told stays safe.
    """

    def __init__(self, interval: float = 0.5, leeway: float = 300.0):
        self.interval = interval
        self.leeway = leeway
        # key -> (value, expiry as a unix time); the heap orders (expiry, kind, key) for pruning
        self._jti: dict[str, tuple[str, float]] = {}
        self._family: dict[str, tuple[str, float]] = {}
        self._generation: dict[str, tuple[int, float]] = {}
        self._expiries: list[tuple[float, str, str]] = []
        self._last_id = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.healthy = False

    def __len__(self) -> int:
        """How many entries are held (jti + family + generation)."""
        return len(self._jti) + len(self._family) + len(self._generation)

    def refresh(self, now: float | None = None) -> int:
        """Load events newer than the last seen, drop the expired ones; return how many were loaded.

        Raises peewee errors. `now` is a unix time (tests pass their own clock).
        """
        now = time.time() if now is None else now
        E = RevocationEvent
        query = E.select(E.id, E.kind, E.value, E.generation, E.reason, E.expires_at).where(E.id > self._last_id)
        if self._last_id == 0:
            query = query.where(E.expires_at >= from_timestamp(now - self.leeway))
        rows = list(query.order_by(E.id).tuples())
        with self._lock:
            for rid, kind, value, generation, reason, expires_at in rows:
                self._add(kind, value, generation, reason, _timestamp(expires_at))
                self._last_id = max(self._last_id, rid)
            self._prune(now)
        self.healthy = True
        return len(rows)

    def _add(self, kind: str, value: str, generation: int | None, reason: str, expires: float) -> None:
        if kind == "jti" or kind == "family":
            table = self._jti if kind == "jti" else self._family
            old = table.get(value)
            table[value] = (reason, max(expires, old[1]) if old else expires)
        elif kind == "generation":
            old_gen = self._generation.get(value)
            gen = generation or 0
            if old_gen is None or gen >= old_gen[0]:
                # the higher floor covers every token the lower one did: keep it as long as either
                keep = max(expires, old_gen[1]) if old_gen else expires
                self._generation[value] = (gen, keep)
            else:
                self._generation[value] = (old_gen[0], max(expires, old_gen[1]))
        else:
            return
        heapq.heappush(self._expiries, (expires, kind, value))

    def _prune(self, now: float) -> None:
        """Drop every entry whose tokens expired more than `leeway` seconds before `now`."""
        tables: dict[str, dict[str, Any]] = {"jti": self._jti, "family": self._family, "generation": self._generation}
        horizon = now - self.leeway
        while self._expiries and self._expiries[0][0] < horizon:
            _, kind, value = heapq.heappop(self._expiries)
            entry = tables[kind].get(value)
            if entry is not None and entry[1] < horizon:  # a later event may have extended it
                del tables[kind][value]

    def is_revoked(self, claims: dict[str, Any]) -> str | None:
        """The reason these token claims are revoked, or None."""
        entry = self._jti.get(claims.get("jti", ""))  # type: ignore[arg-type]
        if entry is not None:
            return entry[0]
        entry = self._family.get(claims.get("fam", ""))  # type: ignore[arg-type]
        if entry is not None:
            return entry[0]
        floor = self._generation.get(str(claims.get("sub")))
        if floor is not None and int(claims.get("gen", 0)) < floor[0]:
            return "revoked"
        return None

    def start(self, db: pw.Database | None = None) -> None:
        """Poll in a daemon thread every `interval` seconds until stop()."""

        # A pool hands the connection back after each poll; SQLite keeps this
        # thread's one connection open instead of reopening it twice a second.
        pooled = isinstance(db, PooledDatabase)

        def run() -> None:
            while not self._stop.is_set():
                try:
                    if db is None:
                        self.refresh()
                    elif pooled:
                        with db.connection_context():
                            self.refresh()
                    else:
                        db.connect(reuse_if_open=True)
                        self.refresh()
                except Exception as exc:  # keep the last good copy; say so once per failure streak
                    if self.healthy:
                        log.warning("revocation refresh failed: %s", exc)
                    self.healthy = False
                    if db is not None and not pooled:
                        with contextlib.suppress(Exception):
                            db.close()  # reconnect on the next poll
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="revocation-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
