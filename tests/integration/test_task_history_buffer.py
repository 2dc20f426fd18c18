"""The buffered task history keeps its rows when the database cannot take them for a while.

Real databases: a SQLite file locked by another connection, and a PostgreSQL pool with its one
connection held by another thread (the pool exhaustion a cluster host with a small pool met,
where rows were dropped before).
"""

from __future__ import annotations

import sqlite3
import threading

import peewee as pw
import pytest

from appliance import db as dbmod
from appliance.db.models import Task, TaskHistory, TaskLog, database
from appliance.tasks import records


def _open(cfg):
    handle = dbmod.open_database(cfg)
    dbmod.migrate(handle)
    Task.create(id="t1", task_type="sample", input={})
    return handle


def _rows(n: int) -> list[dict]:
    return [{"task": "t1", "status": "running", "message": f"step {i}", "at": records.utcnow()} for i in range(n)]


def test_a_locked_sqlite_database_keeps_the_rows_for_the_next_flush(make_config):
    cfg = make_config(database={"busy_timeout_ms": 50})
    handle = _open(cfg)
    buf = records._Buffer()
    buf.history = _rows(3)
    buf.logs = [{"task": "t1", "line": "hello", "level": "info", "at": records.utcnow()}]
    locker = sqlite3.connect(cfg.path(cfg.database.sqlite_file), isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(pw.OperationalError):
            buf.flush()
        assert [r["message"] for r in buf.history] == ["step 0", "step 1", "step 2"] and len(buf.logs) == 1
        buf.history.append({"task": "t1", "status": "succeeded", "message": "later", "at": records.utcnow()})
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    buf.flush()
    assert [h.message for h in TaskHistory.select().order_by(TaskHistory.id)] == ["step 0", "step 1", "step 2", "later"]
    assert TaskLog.select().count() == 1 and buf.history == [] and buf.logs == []
    handle.close()


def test_a_row_of_a_deleted_task_is_left_out_and_the_others_are_written(make_config):
    handle = _open(make_config())
    buf = records._Buffer()
    buf.history = _rows(2) + [{"task": "gone", "status": "running", "message": "orphan", "at": records.utcnow()}]
    buf.flush()
    assert sorted(h.message for h in TaskHistory.select()) == ["step 0", "step 1"]
    handle.close()


def test_the_buffer_is_bounded_and_keeps_the_newest(monkeypatch):
    monkeypatch.setattr(records, "MAX_BUFFERED", 5)
    buf = records._Buffer()
    buf.history = _rows(2)
    buf._put_back(_rows(6), [])
    # the 6 put back go in front of the 2 buffered since; the 3 oldest of the 8 are dropped
    assert [r["message"] for r in buf.history] == ["step 3", "step 4", "step 5", "step 0", "step 1"]


@pytest.mark.slow
def test_an_exhausted_postgresql_pool_keeps_the_rows_for_the_next_flush(make_config, request):
    # the smallest pool the config allows (concurrency + 2), every connection held by another thread
    cfg = make_config(database={"url": request.getfixturevalue("pg_url"), "max_connections": 3}, queue={"concurrency": 1})
    handle = _open(cfg)
    buf = records._Buffer()
    buf.history = _rows(2)
    database.close()  # give this thread's connection back to the pool
    held, release = threading.Semaphore(0), threading.Event()

    def hold() -> None:
        database.connect(reuse_if_open=True)
        database.execute_sql("SELECT 1")
        held.release()
        release.wait(60)
        database.close()

    holders = [threading.Thread(target=hold) for _ in range(cfg.database.max_connections)]
    for t in holders:
        t.start()
    try:
        for _ in holders:
            assert held.acquire(timeout=10)
        with pytest.raises(Exception, match="(?i)max connections"):
            buf.flush()  # waits for the pool's timeout, then gives up
        assert [r["message"] for r in buf.history] == ["step 0", "step 1"]
    finally:
        release.set()
        for t in holders:
            t.join(10)
    buf.flush()
    assert sorted(h.message for h in TaskHistory.select()) == ["step 0", "step 1"]
    handle.close_all() if hasattr(handle, "close_all") else handle.close()
