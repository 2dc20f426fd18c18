"""The Huey factory: Huey as the fast path, the tasks table as the source of truth.

Offers:
- `get_queue(cfg)`: this process's Huey instance. SqliteHuey in <data_dir>/queue.db by
  default; PriorityRedisHuey when [redis] url is set (keys start with [redis] key_prefix).
  Huey carries only small messages `(task_id, attempt)`; everything else lives in the
  task row (appliance.db.models.Task).
- `enqueue(cfg, task_id, attempt, priority, eta)`: hand one attempt of a task to the queue.
- `depth(cfg)`: messages waiting.
- `set_executor(huey, fn)`: what runs a message in this process. Producers (the API, the
  scheduler) only enqueue; the worker role installs its runner here before consuming, so
  this module, and everything that enqueues, never imports the worker's code.

Priorities: API priority 1 (most urgent) .. 10 maps onto Huey priority 10 .. 1
(Huey runs higher numbers first), so 1 runs before 10 when both wait.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Callable
from typing import Any

from appliance.times import UTC

RUN_TASK = "appliance.run"
_lock = threading.Lock()
_queues: dict[tuple[str, str, str], Any] = {}
_hot: tuple[Any, Any] = (None, None)  # (config, its Huey) of the last get_queue: one atomic read


def huey_priority(priority: int) -> int:
    """API priority 1..10 (1 most urgent) -> Huey priority 10..1 (higher runs first)."""
    return 11 - max(1, min(10, int(priority)))


def queue_name(cfg: Any) -> str:
    return f"{cfg.redis.key_prefix}tasks" if cfg.redis.url else "tasks"


def _key(cfg: Any) -> tuple[str, str, str]:
    return (cfg.redis.url, cfg.redis.key_prefix, str(cfg.path("queue.db")))


class _MessagesOnly:
    """Huey without its revocation keys: cancellation lives in the task row (checked at claim),
    so the two extra queue round trips per task that revocation costs are skipped."""

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        return False

    def delete(self, key: str) -> bool:
        if key.startswith("r:"):
            return False
        return super().delete(key)  # type: ignore[misc]


class _WalNormal:
    """SqliteHuey's queue file with synchronous=NORMAL (WAL) instead of SQLite's FULL.

    A commit no longer waits for an fsync, which was half the cost of a submit and of every dequeue on
    SQLite. A process crash loses nothing (WAL); a power loss can lose the last messages, and those are
    exactly what the reaper's lost-message resend recovers from the tasks table (the source of truth,
    whose own file keeps its settings).
    """

    def _create_connection(self) -> Any:
        conn = super()._create_connection()  # type: ignore[misc]
        conn.execute("pragma synchronous=1")
        return conn


def _create(cfg: Any) -> Any:
    from appliance.lean_import import import_without

    lib = import_without("huey", "gevent")  # no greenlet workers here: see appliance/lean_import.py
    PriorityRedisHuey, SqliteHuey = lib.PriorityRedisHuey, lib.SqliteHuey

    if cfg.redis.url:
        cls = type("ApplianceRedisHuey", (_MessagesOnly, PriorityRedisHuey), {})
        huey = cls(queue_name(cfg), url=cfg.redis.url, results=False, utc=True, clean_name=False, blocking=True, read_timeout=1)
    else:
        path = cfg.path("queue.db")
        path.parent.mkdir(parents=True, exist_ok=True)
        cls = type("ApplianceSqliteHuey", (_MessagesOnly, _WalNormal, SqliteHuey), {})
        huey = cls(queue_name(cfg), filename=str(path), results=False, utc=True, timeout=30)

    def run(task_id: str, attempt: int) -> None:
        huey.appliance_executor(task_id, attempt)

    huey.appliance_executor = _not_a_worker
    huey.appliance_run = huey.task(name=RUN_TASK)(run)
    return huey


def _not_a_worker(task_id: str, attempt: int) -> None:
    raise RuntimeError("this process only enqueues tasks: a worker installs its runner with set_executor")


def set_executor(huey: Any, execute: Callable[[str, int], None]) -> None:
    """Make `execute(task_id, attempt)` run the messages this process's consumer takes off `huey`."""
    huey.appliance_executor = execute


def get_queue(cfg: Any) -> Any:
    """The process-wide Huey instance for this config."""
    global _hot
    hot_cfg, hot_huey = _hot
    if cfg is hot_cfg:  # the hot path (every submit): no key building, no lock
        return hot_huey
    key = _key(cfg)
    with _lock:
        huey = _queues.get(key)
        if huey is None:
            huey = _queues[key] = _create(cfg)
        _hot = (cfg, huey)
    return huey


def enqueue(cfg: Any, task_id: str, attempt: int, priority: int, eta: _dt.datetime | None = None) -> None:
    """Put one attempt of a task on the queue; `eta` (naive UTC) delays it."""
    huey = get_queue(cfg)
    msg = huey.appliance_run.s(task_id, attempt, priority=huey_priority(priority))
    if eta is not None and eta > _dt.datetime.now(UTC).replace(tzinfo=None):
        msg.eta = eta
        huey.add_schedule(msg)
    else:
        huey.enqueue(msg)


def depth(cfg: Any) -> dict[str, int]:
    """Messages waiting in the queue and in its schedule (eta / retry delays)."""
    huey = get_queue(cfg)
    return {"pending": int(huey.pending_count()), "scheduled": int(huey.scheduled_count())}
