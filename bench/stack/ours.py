"""The appliance as the benchmark runs it: one `appliance run` with the process counts of the reference stack.

One balancer, three api workers (8 waitress threads each, the defaults), two
task workers (the default concurrency), the monitor (the scheduler a thread of its process), on a
fresh PostgreSQL database with the queue on the shared Redis (per-run key
prefix), or on SQLite in its data dir (the embedded default) for the extra row.
Rate limits are on with zones that never reject (the check still runs); the
per-user task quotas are off, as the reference has none; bcrypt cost 12 both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import subprocess
from pathlib import Path
from typing import Any

from bench.stack.reference import BCRYPT_ROUNDS, PASSWORD, USERNAME
from bench.tasks import PG_URL, REDIS_URL, _cleanup_redis, _pg_database
from tests.conftest import write_config
from tests.integration.supervised import Appliance
from tests.procs import appliance_cmd

NEVER = {"rate": "100000/s", "burst": 100000, "nodelay": True}
ZONES = [
    {"name": "login", "prefixes": ["/auth/login", "/auth/register"], "methods": ["POST"], "key": "address", **NEVER},
    {"name": "api", "prefixes": ["/api/", "/tasks", "/auth/"], "methods": [], "key": "user", **NEVER},
]


class ApplianceStack:
    """start() / stop(); the pids the scenarios read or kill; what a client needs (port, login)."""

    def __init__(self, tmp: Path, engine: str = "postgresql"):
        self.engine = engine
        self.name = "appliance" if engine == "postgresql" else f"appliance ({engine})"
        self.dir = tmp / f"appliance-{engine}"
        self.dir.mkdir(parents=True)
        self.prefix = f"appliance-bench-{secrets.token_hex(3)}:"
        self._pg: Any = None
        self.app: Appliance | None = None
        self.cfg: Any = None

    def start(self) -> ApplianceStack:
        sections: dict[str, Any] = {
            "queue": {"workers": 2, "user_max_pending": 0, "user_max_running": 0},
            "rate_limits": {"enabled": True, "zones": ZONES},
        }
        if self.engine == "postgresql":
            url, self._pg = _pg_database(PG_URL)
            sections["database"] = {"url": url}
            sections["redis"] = {"url": REDIS_URL, "key_prefix": self.prefix}
        app = Appliance(self.dir, api_workers=3, monitor=True, **sections)
        app.sections["api"]["threads"] = 8  # the defaults, not the test helper's small ones
        app.sections["queue"].update(workers=2, concurrency=4)
        app.sections["balancer"]["health_interval"] = 2.0
        app.sections["auth"] = {"bcrypt_rounds": BCRYPT_ROUNDS, "access_token_minutes": 60}
        app.sections["supervisor"]["heartbeat_interval"] = 2.0
        app.config = write_config(app.data, **app.sections)
        # app.start() would give the supervisor a session of its own: one autogroup, see reference.py
        app.proc = subprocess.Popen(
            appliance_cmd("run", "--config", str(app.config)), stdout=open(app.log, "ab"), stderr=subprocess.STDOUT, env=app.env
        )
        app.wait_for("appliance is up", timeout=90)
        self.app = app
        self.port = app.port
        from appliance import accounts
        from appliance import db as dbmod
        from appliance.config import load_config

        self.cfg = load_config(app.config, env={})
        self.db = dbmod.open_database(self.cfg)
        accounts.create_user(USERNAME, "bench@example.com", PASSWORD, rounds=BCRYPT_ROUNDS, min_length=8)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
        if self.app is not None:
            self.app.stop()
        if self.engine == "postgresql":
            with contextlib.suppress(Exception):
                _cleanup_redis(self.prefix)
        if self._pg is not None:
            conn, name = self._pg
            with contextlib.suppress(Exception), conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()

    @property
    def credentials(self) -> dict[str, str]:
        return {"username": USERNAME, "password": PASSWORD}

    def roots(self) -> list[int]:
        assert self.app is not None and self.app.proc is not None
        return [self.app.proc.pid]

    def names(self) -> dict[int, str]:
        """pid -> role of every process the supervisor runs (children forked from a template share one command line)."""
        assert self.app is not None and self.app.proc is not None
        rows = self.app.status().get("processes", [])
        return {self.app.proc.pid: "supervisor", **{r["pid"]: r["role"] for r in rows if r.get("pid")}}

    def api_worker_pid(self) -> int:
        assert self.app is not None
        return self.app.pids("api")[0]

    def api_worker_pids(self) -> set[int]:
        assert self.app is not None
        return set(self.app.pids("api").values())

    def task_worker_pid(self) -> int:
        assert self.app is not None
        return self.app.pids("worker")[0]

    def task_outcomes(self, ids: list[str]) -> dict[str, tuple[str, float | None]]:
        """task id -> (status, finished unix time) as the tasks table has them now."""
        from appliance import db as dbmod
        from appliance.db.models import Task

        self.db = dbmod.open_database(self.cfg)  # the other appliance row may have pointed the models elsewhere
        out: dict[str, tuple[str, float | None]] = {}
        for i in range(0, len(ids), 500):
            rows = Task.select(Task.id, Task.status, Task.finished_at).where(Task.id.in_(ids[i : i + 500]))
            for r in rows:
                done = r.finished_at.replace(tzinfo=dt.UTC).timestamp() if r.finished_at and r.status == "succeeded" else None
                out[r.id] = (r.status, done)
        self.db.close()
        return out

    def history_rows(self, ids: list[str]) -> int:
        """Durable history rows of these tasks (queued, running, succeeded: three for a task that ran once)."""
        from appliance import db as dbmod
        from appliance.db.models import TaskHistory

        self.db = dbmod.open_database(self.cfg)
        total = sum(TaskHistory.select().where(TaskHistory.task.in_(ids[i : i + 500])).count() for i in range(0, len(ids), 500))
        self.db.close()
        return total
