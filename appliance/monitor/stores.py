"""What the monitor samples from the database and Redis: the queue, the stores themselves, security.

The tasks table is the queue's source of truth (appliance/queue), so depth per
priority, throughput, the oldest waiting task and the recent failures are read
there, on SQLite and PostgreSQL alike, with queries the indexes on
(status, priority, created_at) answer. Security counts come from the login
throttle rows (locked accounts and addresses) and the audit events (failed
logins and lockouts of the last minute, failed logins of the last hour by address). Each part reports {"error": ...} instead
of raising, so one unreachable store does not blank the page.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

import peewee as pw

from appliance.db.models import AuditEvent, LoginThrottle, NodeHeartbeat, Task

FAILURES_SHOWN = 20


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _utc(ts: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).replace(tzinfo=None)


def _iso(value: _dt.datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


ENDED = ("stopped", "exited")  # a process that said goodbye: its host is stopped, not down


def hosts_sample(now: float, heartbeat_timeout: float, here: str) -> dict[str, Any]:
    """Every host that has heartbeat rows (one database, so every host of a cluster), each up, down or stopped.

    A process is stale when its last beat is older than the heartbeat timeout (the rule of
    /health/nodes); a host is down when none of its processes beats and not all of them ended.
    """
    cutoff = _utc(now - heartbeat_timeout)
    hosts: dict[str, dict[str, Any]] = {}
    for name, status, last in NodeHeartbeat.select(NodeHeartbeat.host, NodeHeartbeat.status, NodeHeartbeat.last_heartbeat).tuples():
        h = hosts.setdefault(name, {"host": name, "this": name == here, "processes": 0, "beating": 0, "ended": 0, "last": None})
        h["processes"] += 1
        if status in ENDED:
            h["ended"] += 1
        elif last is not None and last >= cutoff:
            h["beating"] += 1
        if last is not None and (h["last"] is None or last > h["last"]):
            h["last"] = last
    out = []
    for h in sorted(hosts.values(), key=lambda h: (not h["this"], h["host"])):
        state = "up" if h["beating"] else ("stopped" if h["ended"] == h["processes"] else "down")
        age = round(now - h["last"].replace(tzinfo=_dt.UTC).timestamp(), 1) if h["last"] else None
        out.append(
            {
                "host": h["host"],
                "this": h["this"],
                "state": state,
                "processes": h["processes"],
                "beating": h["beating"],
                "last_heartbeat_age": age,
            }
        )
    return {"hosts": out, "down": sum(1 for h in out if h["state"] == "down")}


def queue_sample(now: float) -> dict[str, Any]:
    minute_ago, hour_ago = _utc(now - 60), _utc(now - 3600)
    by_status = {s: n for s, n in Task.select(Task.status, pw.fn.COUNT(Task.id)).group_by(Task.status).tuples()}
    by_priority = {
        str(p): n
        for p, n in Task.select(Task.priority, pw.fn.COUNT(Task.id)).where(Task.status == "queued").group_by(Task.priority).tuples()
    }
    last_minute = {
        s: n
        for s, n in Task.select(Task.status, pw.fn.COUNT(Task.id))
        .where(Task.finished_at > minute_ago, Task.status.in_(("succeeded", "failed")))
        .group_by(Task.status)
        .tuples()
    }
    oldest = Task.select(pw.fn.MIN(Task.created_at)).where(Task.status == "queued").scalar()
    if isinstance(oldest, str):  # SQLite hands back text for an aggregate of a datetime column
        oldest = _dt.datetime.fromisoformat(oldest)
    by_type: dict[str, dict[str, int]] = {}
    for task_type, status, n in (
        Task.select(Task.task_type, Task.status, pw.fn.COUNT(Task.id))
        .where(Task.finished_at > hour_ago, Task.status.in_(("succeeded", "failed")))
        .group_by(Task.task_type, Task.status)
        .tuples()
    ):
        by_type.setdefault(task_type, {"succeeded": 0, "failed": 0})[status] = n
    failures = [
        {
            "id": t.id,
            "task_type": t.task_type,
            "error": (t.error or "")[:300],
            "error_code": t.error_code,
            "finished_at": _iso(t.finished_at),
        }
        for t in Task.select(Task.id, Task.task_type, Task.error, Task.error_code, Task.finished_at)
        .where(Task.status == "failed")
        .order_by(Task.finished_at.desc())
        .limit(FAILURES_SHOWN)
    ]
    done = last_minute.get("succeeded", 0) + last_minute.get("failed", 0)
    return {
        "by_status": by_status,
        "queued": by_status.get("queued", 0),
        "running": by_status.get("running", 0),
        "queued_by_priority": by_priority,
        "succeeded_per_min": last_minute.get("succeeded", 0),
        "failed_per_min": last_minute.get("failed", 0),
        "success_ratio": round(last_minute.get("succeeded", 0) / done, 4) if done else None,
        "oldest_queued_age": round(now - oldest.replace(tzinfo=_dt.UTC).timestamp(), 1) if oldest else None,
        "by_type": [{"task_type": k, **v} for k, v in sorted(by_type.items())],
        "recent_failures": failures,
    }


def database_sample(db: pw.Database, cfg: Any) -> dict[str, Any]:
    started = time.perf_counter()
    db.execute_sql("SELECT 1").fetchone()
    out: dict[str, Any] = {"reachable": True, "round_trip_ms": round((time.perf_counter() - started) * 1000, 2)}
    if cfg.database.url:
        out["engine"] = "postgresql"
        size, conns = db.execute_sql(
            "SELECT pg_database_size(current_database()), (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())"
        ).fetchone()
        out.update(size_bytes=int(size), connections=int(conns))
    else:
        out["engine"] = "sqlite"
        path = cfg.path(cfg.database.sqlite_file)
        out["size_bytes"] = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    return out


class RedisProbe:
    """PING and a few INFO fields of the configured Redis; one client, made on first use."""

    def __init__(self, url: str):
        self.url = url
        self._client: Any = None

    def sample(self) -> dict[str, Any] | None:
        if not self.url:
            return None
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            started = time.perf_counter()
            self._client.ping()
            rtt = round((time.perf_counter() - started) * 1000, 2)
            info = self._client.info(section="clients")
            mem = self._client.info(section="memory")
            return {
                "reachable": True,
                "round_trip_ms": rtt,
                "connections": info.get("connected_clients"),
                "used_memory": mem.get("used_memory"),
            }
        except Exception as exc:
            return {"reachable": False, **_error(exc)}


def security_sample(now: float) -> dict[str, Any]:
    current = _utc(now)
    locked = [row.key for row in LoginThrottle.select(LoginThrottle.key).where(LoginThrottle.locked_until > current).limit(1000)]
    top = [
        {"address": a or "?", "failures": n}
        for a, n in AuditEvent.select(AuditEvent.address, pw.fn.COUNT(AuditEvent.id).alias("n"))
        .where(AuditEvent.event == "login_failed", AuditEvent.at > _utc(now - 3600))
        .group_by(AuditEvent.address)
        .order_by(pw.SQL("n").desc())
        .limit(5)
        .tuples()
    ]
    return {
        "locked_accounts": sum(1 for k in locked if k.startswith("user:")),
        "locked_addresses": sum(1 for k in locked if k.startswith("addr:")),
        "failed_logins_last_hour": AuditEvent.select().where(AuditEvent.event == "login_failed", AuditEvent.at > _utc(now - 3600)).count(),
        # Per minute from the audit trail: every login surface (API, status page) and every host counts.
        "failed_logins_per_min": AuditEvent.select().where(AuditEvent.event == "login_failed", AuditEvent.at > _utc(now - 60)).count(),
        "lockouts_per_min": AuditEvent.select().where(AuditEvent.event == "login_lockout", AuditEvent.at > _utc(now - 60)).count(),
        "top_addresses": top,
    }
