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
visible everywhere within about one interval.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import threading
from typing import Any

import peewee as pw
from playhouse.pool import PooledDatabase

from appliance.db.models import RevocationEvent
from appliance.times import from_timestamp, utcnow

log = logging.getLogger(__name__)


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
    """In-memory copy of the revocation log; `is_revoked` is cheap and safe from any thread."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._jti: dict[str, str] = {}
        self._family: dict[str, str] = {}
        self._generation: dict[str, int] = {}
        self._last_id = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.healthy = False

    def refresh(self, now: float | None = None) -> int:
        """Load events newer than the last seen; return how many. Raises peewee errors."""
        now_dt = utcnow() if now is None else from_timestamp(now)
        E = RevocationEvent
        query = E.select(E.id, E.kind, E.value, E.generation, E.reason).where(E.id > self._last_id)
        if self._last_id == 0:
            query = query.where(E.expires_at >= now_dt)
        rows = list(query.order_by(E.id).tuples())
        with self._lock:
            for rid, kind, value, generation, reason in rows:
                if kind == "jti":
                    self._jti[value] = reason
                elif kind == "family":
                    self._family[value] = reason
                elif kind == "generation":
                    if generation > self._generation.get(value, -1):
                        self._generation[value] = generation
                self._last_id = max(self._last_id, rid)
        self.healthy = True
        return len(rows)

    def is_revoked(self, claims: dict[str, Any]) -> str | None:
        reason = self._jti.get(claims.get("jti", ""))  # type: ignore[arg-type]
        if reason is not None:
            return reason
        reason = self._family.get(claims.get("fam", ""))  # type: ignore[arg-type]
        if reason is not None:
            return reason
        floor = self._generation.get(str(claims.get("sub")))
        if floor is not None and int(claims.get("gen", 0)) < floor:
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
