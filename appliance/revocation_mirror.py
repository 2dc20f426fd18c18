"""The reader side of token revocation: an in-memory mirror of the revocation log, without peewee.

`RevocationMirror` keeps a copy of the append-only `revocation_event` table
(appliance/revocation.py writes it; appliance/db/models.py defines it), refreshed
by polling rows with id > last seen (one indexed query, every `interval` seconds,
off the request path), so a check is a few dict lookups and a revocation is
visible everywhere within about one interval. Each entry is kept until the
tokens it revokes have expired (the event's expires_at plus the verifier's
leeway) and then dropped, so a long-running process holds only the revocations
that can still matter, not every logout since it started.

Where the rows come from is an EventSource. The API workers use the peewee one
(appliance.revocation.RevocationMirror). The balancer uses `SqlEvents`: one plain
SELECT through sqlite3 or psycopg2 on a connection of its own, so the proxy
process never imports peewee or the models.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import logging
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

UTC = _dt.UTC
# (id, kind, value, generation, reason, expires_at as a unix time)
Event = tuple[int, str, str, "int | None", str, float]
_COLUMNS = "id, kind, value, generation, reason, expires_at"


class EventSource(Protocol):
    def events(self, after_id: int, expiring_since: float | None) -> list[Event]:
        """Events with id > after_id (and, when given, expires_at >= expiring_since), by id."""
        ...

    def reset(self) -> None:
        """A poll failed: drop the connection, the next poll opens a new one."""
        ...


def naive_utc(ts: float) -> _dt.datetime:
    """A unix time as the naive UTC datetime the columns hold."""
    return _dt.datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def unix_time(value: _dt.datetime | str) -> float:
    """A naive UTC column value (datetime, or SQLite's text) as a unix time."""
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC).timestamp()


class SqlEvents:
    """Rows read with the DB-API driver itself (sqlite3 or psycopg2): no ORM in the reading process.

    The connection is opened on the first poll, in the polling thread, and kept.
    """

    def __init__(self, cfg: Any):
        db = cfg.database
        self.url = db.url
        self.sqlite_path = None if db.url else str(cfg.path(db.sqlite_file))
        self.timeout = db.busy_timeout_ms / 1000.0
        self._conn: Any = None

    def _connect(self) -> Any:
        if self.sqlite_path is not None:
            import sqlite3  # only the engine in use is loaded, once

            conn = sqlite3.connect(self.sqlite_path, timeout=self.timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            return conn
        import psycopg2

        conn = psycopg2.connect(self.url, connect_timeout=5, application_name="appliance-revocations")
        conn.autocommit = True
        return conn

    def events(self, after_id: int, expiring_since: float | None) -> list[Event]:
        if self._conn is None:
            self._conn = self._connect()
        mark = "?" if self.sqlite_path is not None else "%s"
        sql = f"SELECT {_COLUMNS} FROM revocation_event WHERE id > {mark}"
        params: list[Any] = [after_id]
        if expiring_since is not None:
            since = naive_utc(expiring_since)
            sql += f" AND expires_at >= {mark}"
            params.append(str(since) if self.sqlite_path is not None else since)  # SQLite holds str(datetime)
        cur = self._conn.cursor()
        try:
            cur.execute(sql + " ORDER BY id", params)
            rows = cur.fetchall()
        finally:
            cur.close()
        return [(rid, kind, value, gen, reason, unix_time(exp)) for rid, kind, value, gen, reason, exp in rows]

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class RevocationMirror:
    """In-memory copy of the revocation log; `is_revoked` is cheap and safe from any thread.

    `leeway` is the clock skew the token verifier allows past exp: an entry is
    dropped only once its tokens are refused as expired anyway. The default is
    the largest leeway the config accepts, so a reader that is not told stays safe.
    """

    def __init__(self, interval: float = 0.5, leeway: float = 300.0, source: EventSource | None = None):
        self.interval = interval
        self.leeway = leeway
        self.source = source
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

        Raises what the source raises. `now` is a unix time (tests pass their own clock).
        """
        now = time.time() if now is None else now
        assert self.source is not None, "a RevocationMirror needs an event source"
        rows = self.source.events(self._last_id, now - self.leeway if self._last_id == 0 else None)
        with self._lock:
            for rid, kind, value, generation, reason, expires in rows:
                self._add(kind, value, generation, reason, expires)
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

    def start_polling(self) -> None:
        """Poll the source in a daemon thread every `interval` seconds until stop()."""

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception as exc:  # keep the last good copy; say so once per failure streak
                    if self.healthy:
                        log.warning("revocation refresh failed: %s", exc)
                    self.healthy = False
                    if self.source is not None:
                        try:
                            self.source.reset()  # reconnect on the next poll
                        except Exception:
                            pass
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="revocation-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
