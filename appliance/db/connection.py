"""Opening the database named by the config, in any process.

SQLite (default): one file in the data dir, WAL, busy timeout, foreign keys on.
PostgreSQL: a connection pool per process; a connection idle for more than
PROBE_IDLE_SECONDS is probed by the pool before it is handed out (one used
more recently is not: see PostgresDatabase._is_closed), and a statement that
fails because the server restarted (outside a transaction) reconnects once and
runs again (ReconnectMixin with the psycopg2 messages). After os.fork() the child forgets the parent's
connections without closing them (closing would end the parent's sessions).
"""

from __future__ import annotations

import os
import time
import urllib.parse
from typing import Any

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase
from playhouse.shortcuts import ReconnectMixin

from appliance.db.models import database

_FORGOTTEN: list[Any] = []  # connections inherited over fork: kept referenced so GC never closes them
PROBE_IDLE_SECONDS = 1.0


class PostgresDatabase(ReconnectMixin, PooledPostgresqlDatabase):
    reconnect_errors = (
        (pw.OperationalError, "server closed the connection"),
        (pw.OperationalError, "terminating connection"),
        (pw.OperationalError, "connection to server"),
        (pw.OperationalError, "ssl connection has been closed"),
        (pw.OperationalError, "could not receive data"),
        (pw.InterfaceError, "connection already closed"),
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._checked_in: dict[Any, float] = {}  # pool key -> when the connection came back (monotonic)

    def _close(self, conn: Any, close_conn: bool = False) -> None:
        key = self.conn_key(conn)
        if close_conn:
            self._checked_in.pop(key, None)
        else:
            self._checked_in[key] = time.monotonic()
        super()._close(conn, close_conn)

    def _close_raw(self, conn: Any) -> None:
        self._checked_in.pop(self.conn_key(conn), None)
        super()._close_raw(conn)

    def _is_closed(self, conn: Any) -> bool:
        """Whether an idle connection of the pool is dead, asked before it is handed out.

        peewee answers with a SELECT 1 round trip for every check-out: under load that was a
        second round trip per request (an eighth of a task submission's time). A connection
        that came back within PROBE_IDLE_SECONDS is trusted on its local state; a server
        that went away since is met by the reconnect of the first statement (outside a
        transaction) or fails that one request, as it could right after a probe.
        """
        if conn.closed:
            self._checked_in.pop(self.conn_key(conn), None)
            return True
        returned = self._checked_in.get(self.conn_key(conn))
        if returned is not None and time.monotonic() - returned < PROBE_IDLE_SECONDS:
            return False
        dead = bool(super()._is_closed(conn))
        if dead:
            self._checked_in.pop(self.conn_key(conn), None)
        return dead

    def _reconnect(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._reconnect(func, *args, **kwargs)
        except (pw.OperationalError, pw.InterfaceError):
            # A second failure right after reconnecting: drop the pool's idle
            # connections (likely all dead after a server restart) before the error surfaces.
            self._drop_dead()
            raise

    def _drop_dead(self) -> None:
        try:
            self.close_idle()
        except Exception:  # pragma: no cover - best effort cleanup
            pass


def _sqlite(cfg: Any) -> pw.SqliteDatabase:
    path = cfg.path(cfg.database.sqlite_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    return pw.SqliteDatabase(
        str(path),
        pragmas={
            "journal_mode": "wal",
            "busy_timeout": cfg.database.busy_timeout_ms,
            "foreign_keys": 1,
            "synchronous": "normal",
        },
        timeout=cfg.database.busy_timeout_ms / 1000.0,
    )


def _postgres(cfg: Any) -> PostgresDatabase:
    url = cfg.database.url
    parsed = urllib.parse.urlparse(url)
    name = (parsed.path or "/").lstrip("/") or "postgres"
    return PostgresDatabase(
        name,
        dsn=url,
        max_connections=cfg.database.max_connections,
        stale_timeout=cfg.database.stale_timeout,
        timeout=10,
        connect_timeout=5,
        application_name=f"appliance-{os.getpid()}",
    )


def make_database(cfg: Any) -> pw.Database:
    """A new (unbound) database object for the config."""
    return _postgres(cfg) if cfg.database.url else _sqlite(cfg)


def open_database(cfg: Any) -> pw.Database:
    """Create the database for `cfg` and bind every model to it in this process."""
    db = make_database(cfg)
    database.initialize(db)
    return db


def engine_name(cfg: Any) -> str:
    return "postgresql" if cfg.database.url else "sqlite"


def describe(cfg: Any) -> str:
    """Where the data lives, without a password, for logs and messages."""
    if not cfg.database.url:
        return f"sqlite:{cfg.path(cfg.database.sqlite_file)}"
    p = urllib.parse.urlparse(cfg.database.url)
    return f"postgresql://{p.hostname}:{p.port or 5432}{p.path}"


def _after_fork_in_child() -> None:
    db = database.obj
    if db is None:
        return
    state = getattr(db, "_state", None)
    if state is not None and getattr(state, "conn", None) is not None:
        _FORGOTTEN.append(state.conn)
        state.reset()
    if isinstance(db, PooledPostgresqlDatabase):
        _FORGOTTEN.extend(db._connections)
        _FORGOTTEN.extend(db._in_use.values())
        db._connections = []
        db._in_use = {}
        if isinstance(db, PostgresDatabase):
            db._checked_in = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def open_for_role(cfg: Any) -> pw.Database:
    """Open the database for a child role: connect once, migrate when run standalone.

    Under the supervisor the schema is already current (it migrates before any
    child starts): a child handed the config the supervisor migrated (the inherited
    one) does not even ask; a role started by hand, or handed a SIGHUP's new config,
    migrates a stale schema itself. Raises our
    DatabaseError (translated) when the database cannot be used: callers treat
    that as transient and exit 1, so the supervisor retries with backoff.
    """
    from appliance.child_config import inherited_config
    from appliance.db import migrations
    from appliance.db.errors import translated

    handle = open_database(cfg)
    with translated():
        handle.connect(reuse_if_open=True)
        # The supervisor migrated the database of the config it handed the template before it forked any
        # child: asking again would only copy the pages of the migration code into every child.
        if cfg is not inherited_config() and migrations.pending(handle):
            migrations.migrate(handle)
        handle.close()
    return handle
