"""Writes a process's NodeHeartbeat row with the database driver alone: no peewee, no models.

Every role starts a heartbeat, the balancer too, and the balancer must not load peewee or the
models (issue 11: the balancer's imports). One plain DB-API connection of its own (sqlite3 or
psycopg2) and one upsert statement, the same on both engines (INSERT ... ON CONFLICT DO UPDATE,
SQLite 3.24+ and PostgreSQL 9.5+). The columns and their text forms are those of
appliance.db.models.NodeHeartbeat (tests/integration/test_supervisor_heartbeat.py reads the row
back through the model on both engines).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import orjson

TABLE = "node_heartbeat"
COLUMNS = ("node_id", "role", "host", "pid", "status", "cpu", "rss", "started_at", "last_heartbeat", "info")
_UPDATE = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])


def _statement(mark: str) -> str:
    marks = ", ".join([mark] * len(COLUMNS))
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks}) ON CONFLICT (node_id) DO UPDATE SET {_UPDATE}"


class HeartbeatRow:
    """upsert(values) of one row; the connection is opened on first use and again after any failure."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.postgres = bool(cfg.database.url)
        self.sql = _statement("%s" if self.postgres else "?")
        self.conn: Any = None

    def upsert(self, values: dict[str, Any]) -> None:
        row = [self._value(values[c]) for c in COLUMNS]
        try:
            if self.conn is None:
                self.conn = self._connect()
            cur = self.conn.cursor()
            try:
                cur.execute(self.sql, row)
            finally:
                cur.close()
        except Exception:
            self.close()  # a dead or broken connection: a fresh one at the next beat
            raise

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()  # as JSONField stores it
        if isinstance(value, dt.datetime) and not self.postgres:
            return value.isoformat(" ")  # as peewee stores a DateTimeField in SQLite
        return value

    def _connect(self) -> Any:
        if self.postgres:
            import psycopg2

            conn = psycopg2.connect(self.cfg.database.url, connect_timeout=5, application_name=f"appliance-heartbeat-{os.getpid()}")
            conn.autocommit = True
            return conn
        import sqlite3

        timeout_ms = self.cfg.database.busy_timeout_ms
        conn = sqlite3.connect(str(self.cfg.path(self.cfg.database.sqlite_file)), timeout=timeout_ms / 1000.0, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
        return conn
