"""The durable task record: new task rows, history and log rows.

The task row is the source of truth; its status changes only through
appliance.tasks.lifecycle, which inserts rows with `insert_tasks` and notes
each transition here with `add_history`. History and log rows are append-only
and written through a per-process
buffer flushed every FLUSH_INTERVAL seconds in one multi-row INSERT (the bench
goal: durable history without a round trip per transition). A process killed
with -9 loses at most its last FLUSH_INTERVAL of history lines; the state on
the task row itself is never buffered.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from typing import Any

import peewee as pw

from appliance.db.models import Task, TaskHistory, TaskLog, database
from appliance.times import utcnow

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
MAX_BUFFERED = 100_000  # history and log rows held while the database cannot take them (about 30 MB)


def new_id() -> str:
    return secrets.token_hex(16)


class _Buffer:
    """Rows waiting for the next multi-row insert; one per process (restarted after fork)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.history: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.progress: list[Any] = []  # TaskContexts holding progress to write (TaskContext.write_held)
        self.pid = os.getpid()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopped = False

    def ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="task-records", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(FLUSH_INTERVAL)
            self.wake.clear()
            try:
                self.flush()
            except Exception as exc:
                log.warning("writing task history failed (%s: %s); the rows are kept and written at the next try", type(exc).__name__, exc)
                self.wake.wait(1.0)  # not a hot loop while the database is away

    def flush(self) -> None:
        with self.lock:
            history, self.history = self.history, []
            logs, self.logs = self.logs, []
            progress, self.progress = self.progress, []
        for ctx in progress:  # a context whose runner took its progress already has nothing to write
            try:
                ctx.write_held()
            except Exception as exc:
                log.warning("writing the progress of task %s failed (%s: %s)", ctx.task_id, type(exc).__name__, exc)
        if not history and not logs:
            return
        global _history_insert, _log_insert
        _history_insert = _history_insert or _RowInsert(TaskHistory)
        _log_insert = _log_insert or _RowInsert(TaskLog)
        try:
            with database.atomic():
                _history_insert.execute(database.obj, history)
                _log_insert.execute(database.obj, logs)
        except pw.IntegrityError:
            # A row of a task deleted meanwhile (foreign key) must not block the others: one by one,
            # and only the rows the database refuses as such are left out.
            log.warning("batched history write refused a row; writing %d rows one by one", len(history) + len(logs))
            for model, rows in ((TaskHistory, history), (TaskLog, logs)):
                for row in rows:
                    try:
                        model.insert(row).execute()
                    except pw.IntegrityError:
                        log.info("left out a history row of task %s, which no longer exists", row.get("task"))
        except Exception:
            # The database could not take them now (pool exhausted, connection lost, server restarting):
            # the rows go back in front of the buffer for the next flush instead of being dropped.
            self._put_back(history, logs)
            raise

    def _put_back(self, history: list[dict[str, Any]], logs: list[dict[str, Any]]) -> None:
        with self.lock:
            self.history[:0], self.logs[:0] = history, logs
            excess = len(self.history) + len(self.logs) - MAX_BUFFERED
            if excess > 0:  # the database has been away for long: keep the newest, say how many went
                cut_h = min(excess, len(self.history))
                del self.history[:cut_h]
                del self.logs[: excess - cut_h]
                log.error("the database took no task history for too long; dropped the %d oldest buffered rows", excess)


def _chunks(rows: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


_buffer: _Buffer | None = None
_buffer_lock = threading.Lock()


def _buf() -> _Buffer:
    global _buffer
    buf = _buffer
    if buf is None or buf.pid != os.getpid():
        with _buffer_lock:
            if _buffer is None or _buffer.pid != os.getpid():
                _buffer = _Buffer()
            buf = _buffer
    buf.ensure_thread()
    return buf


def add_history(task_id: str, status: str, message: str = "", at: Any = None) -> None:
    buf = _buf()
    with buf.lock:
        buf.history.append({"task": task_id, "status": status, "message": message[:500], "at": at or utcnow()})


def hold_progress(ctx: Any) -> None:
    """A running task's context holds progress it has not written: the next flush writes it."""
    buf = _buf()
    with buf.lock:
        buf.progress.append(ctx)


def add_log(task_id: str, line: str, level: str = "info") -> None:
    buf = _buf()
    with buf.lock:
        buf.logs.append({"task": task_id, "line": line, "level": level[:10], "at": utcnow()})


def flush() -> None:
    """Write buffered history and log rows now (tests, shutdown, before reading them back).

    When the database cannot take them the rows stay buffered for the next try, and this says so
    in the log instead of raising: no caller (a worker stopping, a status read) should fail for it.
    """
    if _buffer is not None and _buffer.pid == os.getpid():
        try:
            _buffer.flush()
        except Exception as exc:
            log.warning("writing task history failed (%s: %s); the rows are kept for the next try", type(exc).__name__, exc)


atexit.register(flush)  # the last rows at exit; a failure is logged, not raised


def history_now(task_id: str, status: str, message: str = "") -> None:
    """A history row written at once (for transitions made outside the worker's hot path)."""
    TaskHistory.create(task=task_id, status=status, message=message[:500], at=utcnow())


# --- new task rows ----------------------------------------------------------------------


class _RowInsert:
    """INSERT of whole rows of `model`, written once: every column but an auto id, in model order, defaults applied.

    Submit's one statement (Task) and the batched history and log writes. peewee's query builder
    spends about as long composing an 18-column INSERT as PostgreSQL spends executing it (and most
    of a worker's flush of history rows), so the SQL text is built once per (engine param, row
    count) and each row only runs the fields' own db_value conversions (JSON, dates, FKs).
    """

    def __init__(self, model: Any = Task) -> None:
        fields = [f for f in model._meta.sorted_fields if not isinstance(f, pw.AutoField)]
        self.table = model._meta.table_name
        self.fields = [(f.name, f.db_value, f.default) for f in fields]
        self.columns = ", ".join(f'"{f.column_name}"' for f in fields)
        self.sql: dict[tuple[str, int], str] = {}

    def values(self, row: dict[str, Any]) -> list[Any]:
        out = []
        for name, db_value, default in self.fields:
            value = row[name] if name in row else (default() if callable(default) else default)
            out.append(db_value(value))
        return out

    def statement(self, param: str, rows: int) -> str:
        sql = self.sql.get((param, rows))
        if sql is None:
            one = "(" + ", ".join([param] * len(self.fields)) + ")"
            sql = self.sql[(param, rows)] = f'INSERT INTO "{self.table}" ({self.columns}) VALUES ' + ", ".join([one] * rows)
        return sql

    def chunk(self, param: str) -> int:
        # SQLite builds may cap bound variables at 999; PostgreSQL takes 65535
        return max(1, (999 if param == "?" else 10000) // len(self.fields))

    def execute(self, db: Any, rows: list[dict[str, Any]]) -> None:
        """Insert `rows` in statements of at most chunk() rows (the caller holds the transaction)."""
        for part in _chunks(rows, self.chunk(db.param)):
            db.execute_sql(self.statement(db.param, len(part)), [v for row in part for v in self.values(row)])


_task_insert: _RowInsert | None = None
_history_insert: _RowInsert | None = None
_log_insert: _RowInsert | None = None


def insert_tasks(rows: list[dict[str, Any]]) -> None:
    """Insert new task rows (dicts of Task field names; missing fields get the model defaults); lifecycle.create calls it.

    One row is one autocommitted statement (no BEGIN/COMMIT round trips): committed before the
    caller hands its message to the queue. Several rows are one transaction of multi-row INSERTs.
    """
    global _task_insert
    ins = _task_insert = _task_insert or _RowInsert(Task)
    db = database.obj
    if len(rows) == 1:
        db.execute_sql(ins.statement(db.param, 1), ins.values(rows[0]))
        return
    with database.atomic():
        ins.execute(db, rows)
