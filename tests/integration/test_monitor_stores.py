"""The monitor's database collectors on SQLite and PostgreSQL: queue depth, throughput, failures, security counts."""

from __future__ import annotations

import time

from appliance.db.models import AuditEvent, LoginThrottle, Task
from appliance.monitor import stores
from appliance.times import from_timestamp


def _task(n: int, status: str, *, at: float, priority: int = 5, task_type: str = "sample", error: str | None = None) -> None:
    Task.create(
        id=f"t{n:04d}",
        task_type=task_type,
        status=status,
        priority=priority,
        error=error,
        created_at=from_timestamp(at - 30),
        finished_at=from_timestamp(at) if status in ("succeeded", "failed") else None,
    )


def test_queue_sample_counts_depth_throughput_and_recent_failures(db, db_config) -> None:
    now = time.time()
    _task(1, "queued", at=now, priority=1)
    _task(2, "queued", at=now - 600, priority=5)  # waiting since now - 630 s
    _task(3, "running", at=now)
    _task(4, "succeeded", at=now - 10)
    _task(5, "failed", at=now - 5, task_type="report", error="boom")
    _task(6, "failed", at=now - 7200, error="old")  # outside the last hour and minute, still in the recent list
    for i in range(30):
        _task(100 + i, "failed", at=now - 3000 - i, task_type="csv_profile", error=f"bad {i}")
    q = stores.queue_sample(now)
    assert q["queued"] == 2 and q["running"] == 1
    assert q["queued_by_priority"] == {"1": 1, "5": 1}
    assert q["succeeded_per_min"] == 1 and q["failed_per_min"] == 1 and q["success_ratio"] == 0.5
    assert 629 <= q["oldest_queued_age"] <= 632
    by_type = {t["task_type"]: t for t in q["by_type"]}
    assert by_type["report"]["failed"] == 1 and by_type["sample"]["succeeded"] == 1 and by_type["csv_profile"]["failed"] == 30
    failures = q["recent_failures"]
    assert len(failures) == stores.FAILURES_SHOWN  # bounded
    assert failures[0]["id"] == "t0005" and failures[0]["error"] == "boom"
    assert all(f["id"] != "t0006" for f in failures)  # the oldest fell off the list of 20


def test_security_sample_counts_locks_and_offenders(db) -> None:
    now = time.time()
    later = from_timestamp(now + 300)
    LoginThrottle.create(key="user:alice", failures=5, locked_until=later)
    LoginThrottle.create(key="addr:203.0.113.9", failures=20, locked_until=later)
    LoginThrottle.create(key="addr:203.0.113.10", failures=20, locked_until=from_timestamp(now - 1))  # expired lock
    for i in range(7):
        AuditEvent.create(event="login_failed", address="203.0.113.9", at=from_timestamp(now - i))
    AuditEvent.create(event="login_failed", address="198.51.100.1", at=from_timestamp(now - 10))
    AuditEvent.create(event="login_failed", address="198.51.100.2", at=from_timestamp(now - 4000))  # over an hour ago
    AuditEvent.create(event="login_success", address="198.51.100.3", at=from_timestamp(now))
    AuditEvent.create(event="login_lockout", address="203.0.113.9", at=from_timestamp(now - 2))
    AuditEvent.create(event="login_lockout", address="203.0.113.9", at=from_timestamp(now - 120))
    s = stores.security_sample(now)
    assert s["locked_accounts"] == 1 and s["locked_addresses"] == 1
    assert s["failed_logins_last_hour"] == 8
    assert s["failed_logins_per_min"] == 8  # 203.0.113.9's seven and the one 10 s old
    assert s["lockouts_per_min"] == 1
    assert s["top_addresses"] == [{"address": "203.0.113.9", "failures": 7}, {"address": "198.51.100.1", "failures": 1}]


def test_database_sample_reports_engine_size_and_round_trip(db, db_config) -> None:
    d = stores.database_sample(db, db_config)
    assert d["reachable"] is True and d["round_trip_ms"] >= 0 and d["size_bytes"] > 0
    assert d["engine"] == ("postgresql" if db_config.database.url else "sqlite")
    if db_config.database.url:
        assert d["connections"] >= 1


def test_redis_probe_reports_an_unreachable_server_without_raising() -> None:
    probe = stores.RedisProbe("redis://127.0.0.1:1/0")
    out = probe.sample()
    assert out["reachable"] is False and "error" in out
    assert stores.RedisProbe("").sample() is None


def test_redis_probe_on_a_real_server(redis_server) -> None:
    out = stores.RedisProbe(redis_server["url"]).sample()
    assert out["reachable"] is True and out["connections"] >= 1


def _beat(node: str, host: str, age: float, now: float, status: str = "running") -> None:
    from appliance.db.models import NodeHeartbeat

    NodeHeartbeat.create(node_id=node, role=node.split(":")[1], host=host, pid=1, status=status, last_heartbeat=from_timestamp(now - age))


def test_hosts_sample_marks_a_host_down_when_none_of_its_processes_beats(db, db_config) -> None:
    now = time.time()
    _beat("host-a:api:0", "host-a", 1, now)
    _beat("host-a:worker:0", "host-a", 40, now)  # one stale process does not take its host down
    _beat("host-b:api:0", "host-b", 40, now)
    _beat("host-b:worker:0", "host-b", 35, now)
    _beat("host-c:api:0", "host-c", 300, now, status="stopped")  # a clean stop: stopped, not down
    sample = stores.hosts_sample(now, heartbeat_timeout=30, here="host-b")
    by_host = {h["host"]: h for h in sample["hosts"]}
    assert [h["host"] for h in sample["hosts"]] == ["host-b", "host-a", "host-c"]  # this host first
    assert by_host["host-a"]["state"] == "up" and by_host["host-a"]["beating"] == 1 and by_host["host-a"]["processes"] == 2
    assert by_host["host-b"]["state"] == "down" and by_host["host-b"]["this"] is True
    assert 34 <= by_host["host-b"]["last_heartbeat_age"] <= 37
    assert by_host["host-c"]["state"] == "stopped" and sample["down"] == 1
