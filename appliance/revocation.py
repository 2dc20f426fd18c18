"""Token revocation: one small interface for writers (API) and readers (balancer, workers).

Every revocation is a row in the append-only `revocation_event` table, which
lives in the shared database and so is cluster-wide:
  kind "jti"        one token (logout of an access token)
  kind "family"     a refresh family and every access token issued with it
  kind "generation" every token of a user issued before generation N
                    (logout-all, password change, account disabled)

Readers on the hot path use a mirror (appliance/revocation_mirror.py: an
in-memory copy polled off the request path). `RevocationMirror` here is that
mirror reading through peewee and the models, for the processes that have them
(api workers, tests); the balancer reads with plain SQL instead (SqlEvents) and
never imports this module.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from typing import Any

import peewee as pw
from playhouse.pool import PooledDatabase

from appliance import revocation_mirror
from appliance.db.models import RevocationEvent
from appliance.revocation_mirror import Event, unix_time
from appliance.times import from_timestamp, utcnow


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


class PeeweeEvents:
    """Revocation events through the models: on `db` when given, else on the database they are bound to."""

    def __init__(self, db: pw.Database | None = None):
        self.db = db
        # A pool hands the connection back after each poll; SQLite keeps this
        # thread's one connection open instead of reopening it twice a second.
        self.pooled = isinstance(db, PooledDatabase)

    def events(self, after_id: int, expiring_since: float | None) -> list[Event]:
        db = self.db
        if db is None:
            return self._select(after_id, expiring_since)
        if self.pooled:
            with db.connection_context():
                return self._select(after_id, expiring_since)
        db.connect(reuse_if_open=True)
        return self._select(after_id, expiring_since)

    @staticmethod
    def _select(after_id: int, expiring_since: float | None) -> list[Event]:
        E = RevocationEvent
        query = E.select(E.id, E.kind, E.value, E.generation, E.reason, E.expires_at).where(E.id > after_id)
        if expiring_since is not None:
            query = query.where(E.expires_at >= from_timestamp(expiring_since))
        return [(rid, kind, value, gen, reason, unix_time(exp)) for rid, kind, value, gen, reason, exp in query.order_by(E.id).tuples()]

    def reset(self) -> None:
        db = self.db
        if db is not None and not self.pooled:
            with contextlib.suppress(Exception):
                db.close()  # reconnect on the next poll


class RevocationMirror(revocation_mirror.RevocationMirror):
    """The mirror reading through peewee (see revocation_mirror.RevocationMirror for the rest).

    `refresh()` raises peewee errors; until `start(db)` it reads on the database the models are bound to.
    """

    def __init__(self, interval: float = 0.5, leeway: float = 300.0):
        super().__init__(interval, leeway, PeeweeEvents())

    def start(self, db: pw.Database | None = None) -> None:
        """Poll in a daemon thread every `interval` seconds until stop()."""
        self.source = PeeweeEvents(db)
        self.start_polling()
