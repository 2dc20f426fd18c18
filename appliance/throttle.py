"""Login defences that do not depend on the balancer: failure counters per account and per address.

Each key ("user:<name>", "addr:<ip>") has a row in LoginThrottle: failures
within the current window (window = [auth] login_lockout_seconds) and
locked_until. Reaching [auth] login_max_failures for an account, or
login_address_max_failures for an address, locks that key for the lockout
period; a locked key is refused with 429 and Retry-After before the password
is even checked. A successful login clears the account's counter (not the
address's, so logging into one's own account cannot reset an attacker's
address). Counters live in the database, so every worker and every host
shares them. Time is a parameter (`now`, naive UTC) for tests.

appliance.logins drives it for every check of a password or a second factor
(login, password change, MFA changes), so all of them share one budget.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from typing import Any

import peewee as pw

from appliance.db.models import LoginThrottle, database
from appliance.times import utcnow


def _key(kind: str, value: str) -> str:
    value = value.strip().lower()
    if len(value) > 200:  # attackers send huge names; keep the key bounded but distinct
        value = "sha256:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()
    return f"{kind}:{value}"


def _write_transaction() -> Any:
    """A transaction that takes the write lock first: on SQLite a read that later writes could
    fail with "database is locked" at once (WAL snapshot upgrade skips the busy timeout)."""
    db = database.obj
    if isinstance(db, pw.SqliteDatabase):
        return db.atomic(lock_type="IMMEDIATE")
    return database.atomic()


class LoginGuard:
    def __init__(self, max_failures: int, address_max_failures: int, lockout_seconds: int):
        self.limits = {"user": max_failures, "addr": address_max_failures}
        self.lockout = _dt.timedelta(seconds=lockout_seconds)

    def retry_after(self, username: str, address: str, now: _dt.datetime | None = None) -> int:
        """Seconds until a login for (username, address) may be tried; 0 when it may now."""
        now = now or utcnow()
        keys = [_key("user", username)] + ([_key("addr", address)] if address else [])
        wait = 0.0
        for row in LoginThrottle.select().where(LoginThrottle.key.in_(keys)):
            if row.locked_until is not None and row.locked_until > now:
                wait = max(wait, (row.locked_until - now).total_seconds())
        return math.ceil(wait)

    def failure(self, username: str, address: str, now: _dt.datetime | None = None) -> list[str]:
        """Count one failed login; return the kinds ("user", "addr") that this failure locked."""
        now = now or utcnow()
        locked: list[str] = []
        for kind, value in (("user", username), ("addr", address)):
            if not value:
                continue
            if self._count(_key(kind, value), self.limits[kind], now):
                locked.append(kind)
        return locked

    def _count(self, key: str, limit: int, now: _dt.datetime) -> bool:
        with _write_transaction():
            row = LoginThrottle.get_or_none(LoginThrottle.key == key)
            if row is None:
                LoginThrottle.insert(key=key, failures=0, window_start=now).on_conflict_ignore().execute()
                row = LoginThrottle.get(LoginThrottle.key == key)
            if row.window_start is None or now - row.window_start > self.lockout:
                row.failures, row.window_start = 0, now
            row.failures += 1
            newly = False
            if row.failures >= limit and (row.locked_until is None or row.locked_until <= now):
                row.locked_until = now + self.lockout
                row.failures = 0
                row.window_start = now
                newly = True
            row.save()
            return newly

    def success(self, username: str) -> None:
        LoginThrottle.delete().where(LoginThrottle.key == _key("user", username)).execute()
