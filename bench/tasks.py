"""Task benchmark: N no-op tasks end to end on Redis, the appliance's workers against a Celery worker.

Run: `python -m bench.tasks [--tasks 2000] [--concurrency 4] [--db postgresql|sqlite]` (Redis at
APPLIANCE_TEST_REDIS_URL or redis://127.0.0.1:6379/0; PostgreSQL at APPLIANCE_TEST_PG_URL).

Both sides run one worker process with the same concurrency (prefork children) on the same
Redis, in the same run, and are measured the same way in two phases:
- drain: N tasks are enqueued before the worker starts; throughput = N / (last task finished -
  first task started): what the worker itself sustains;
- end to end: with the worker running, the client enqueues N tasks one by one; throughput =
  N / (last finished - first enqueued), and each task's enqueue-to-start latency.
- appliance: `appliance _child worker` (PriorityRedisHuey); each task is a durable row with its
  history (queued/running/succeeded) in the database, submitted through appliance.tasks.service.
- Celery: `celery worker --pool prefork` with the Redis broker and the Redis result backend
  (keeping results, as ours keeps history); the task returns its start and end times.
Printed: tasks/s and latency p50/p99 of each, and the ratios appliance/Celery.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any

REDIS_URL = os.environ.get("APPLIANCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("APPLIANCE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def _wait_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start ({text!r}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- the appliance ------------------------------------------------------------------------------


def _pg_database(admin_url: str) -> tuple[str, Any]:
    import psycopg2

    name = f"appliance_bench_{secrets.token_hex(4)}"
    conn = psycopg2.connect(admin_url, connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    p = urllib.parse.urlparse(admin_url)
    return urllib.parse.urlunparse(p._replace(path="/" + name)), (conn, name)


def run_appliance(n: int, concurrency: int, db_kind: str, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from appliance import db as dbmod
    from appliance.config import load_config
    from appliance.db.models import Task
    from appliance.tasks import records, service
    from tests.conftest import write_config

    prefix = f"appliance-bench-{secrets.token_hex(3)}:"
    sections: dict[str, Any] = {
        "queue": {"concurrency": concurrency, "worker_type": "process"},
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
        "logging": {"format": "text", "level": "warning"},
    }
    pg = None
    if db_kind == "postgresql":
        url, pg = _pg_database(PG_URL)
        sections["database"] = {"url": url, "max_connections": concurrency + 2}
    path = write_config(work / "appliance", **sections)
    cfg = load_config(path, env={})
    handle = dbmod.open_database(cfg)
    dbmod.migrate(handle)
    log = work / "appliance-worker.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    req = service.SubmitRequest(task_type="sample", data={"noop": True})
    for _ in range(n):  # the backlog, drained once the worker starts
        service.submit(cfg, service.SYSTEM, req)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "_child", "worker", "--index", "0", "--config", str(path), "--log-format", "text"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**env, "APPLIANCE_LOGGING__LEVEL": "info"},
    )
    try:
        _wait_line(log, "worker ready", proc)
        _wait_done(Task, n)
        rows = list(Task.select(Task.started_at, Task.finished_at))
        drain = n / (max(r.finished_at for r in rows) - min(r.started_at for r in rows)).total_seconds()
        Task.delete().execute()
        time.sleep(0.5)
        t0 = time.time()
        for _ in range(n):
            service.submit(cfg, service.SYSTEM, req)
        enqueue_s = time.time() - t0
        _wait_done(Task, n)
        records.flush()
        time.sleep(0.5)  # the worker's history buffer flushes every 0.1 s
        rows = list(Task.select(Task.created_at, Task.started_at, Task.finished_at))
        elapsed = (max(r.finished_at for r in rows) - min(r.created_at for r in rows)).total_seconds()
        lat = [(r.started_at - r.created_at).total_seconds() * 1000 for r in rows]
        from appliance.db.models import TaskHistory

        hist = TaskHistory.select().count()
        return {"drain_per_s": drain, "tasks_per_s": n / elapsed, "elapsed": elapsed, "enqueue_s": enqueue_s, "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99), "history_rows": hist}  # fmt: skip
    finally:
        _stop(proc)
        handle.close_all() if hasattr(handle, "close_all") else handle.close()
        _cleanup_redis(prefix)
        if pg is not None:
            conn, name = pg
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()


def _wait_done(task_model: Any, n: int) -> None:
    deadline = time.monotonic() + 300
    while task_model.select().where(task_model.status == "succeeded").count() < n:
        if time.monotonic() > deadline:
            raise SystemExit("appliance: tasks did not finish in 300 s")
        time.sleep(0.05)


def _cleanup_redis(pattern: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"*{pattern}*", count=1000):
        client.delete(key)
    client.close()


# --- Celery ---------------------------------------------------------------------------------------

CELERY_APP = """
import time
from celery import Celery

app = Celery("benchapp", broker={broker!r}, backend={broker!r})
app.conf.update(task_default_queue={queue!r}, result_expires=3600, worker_prefetch_multiplier=4,
                broker_connection_retry_on_startup=True, task_serializer="json", result_serializer="json")

@app.task(name="bench.noop")
def noop(sent):
    start = time.time()
    return [sent, start, time.time()]
"""


def run_celery(n: int, concurrency: int, work: Path) -> dict[str, Any]:
    queue = f"celery-bench-{secrets.token_hex(3)}"
    appdir = work / "celeryapp"
    appdir.mkdir()
    (appdir / "benchapp.py").write_text(textwrap.dedent(CELERY_APP.format(broker=REDIS_URL, queue=queue)))
    sys.path.insert(0, str(appdir))
    import benchapp  # type: ignore[import-not-found]

    log = work / "celery-worker.log"
    backlog = [benchapp.noop.delay(time.time()) for _ in range(n)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "--pool", "prefork", "--concurrency", str(concurrency),
         "--loglevel", "INFO", "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=appdir, env={**os.environ, "PYTHONPATH": str(appdir)},
    )  # fmt: skip
    try:
        values = [r.get(timeout=300) for r in backlog]
        drain = n / (max(v[2] for v in values) - min(v[1] for v in values))
        time.sleep(0.5)
        t0 = time.time()
        results = [benchapp.noop.delay(time.time()) for _ in range(n)]
        enqueue_s = time.time() - t0
        values = [r.get(timeout=300) for r in results]
        first = min(v[0] for v in values)
        last = max(v[2] for v in values)
        lat = [(v[1] - v[0]) * 1000 for v in values]
        elapsed = last - first
        return {"drain_per_s": drain, "tasks_per_s": n / elapsed, "elapsed": elapsed, "enqueue_s": enqueue_s, "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99)}  # fmt: skip
    finally:
        _stop(proc)
        _cleanup_redis(queue)
        _cleanup_redis("celery-task-meta-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    try:
        ours = run_appliance(args.tasks, args.concurrency, args.db, work)
        theirs = run_celery(args.tasks, args.concurrency, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"tasks benchmark: {args.tasks} no-op tasks, concurrency {args.concurrency}, Redis broker, appliance database {args.db}")
    print(f"{'':12}{'drain/s':>10}{'e2e/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'enqueue s':>11}{'ms/submit':>11}")
    for name, r in (("appliance", ours), ("celery", theirs)):
        print(
            f"{name:12}{r['drain_per_s']:>10.0f}{r['tasks_per_s']:>10.0f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['enqueue_s']:>11.2f}"
            f"{r['enqueue_s'] * 1000 / args.tasks:>11.2f}"
        )
    print(
        f"ratio appliance/celery: drain throughput {ours['drain_per_s'] / theirs['drain_per_s']:.2f}x, "
        f"end-to-end throughput {ours['tasks_per_s'] / theirs['tasks_per_s']:.2f}x, "
        f"p50 latency {ours['p50_ms'] / max(theirs['p50_ms'], 1e-9):.3g}x, p99 latency {ours['p99_ms'] / max(theirs['p99_ms'], 1e-9):.3g}x"
    )
    print(f"(the appliance also wrote {ours['history_rows']} durable history rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
