"""Shared fixtures of the task tests (no tests here): a backend per parameter, API client, users, workers.

Backends: "sqlite" = SQLite database + SqliteHuey in the data dir; "postgresql" =
a fresh PostgreSQL database + Redis (PriorityRedisHuey) under a key prefix
of its own. `TaskEnv` bundles the config, an in-process Falcon test client, three
users (admin, alice, bob) with tokens, and helpers to start real worker and
scheduler processes (tests.procs) and to wait for task states.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from appliance import accounts, tokens
from appliance import db as dbmod
from appliance.config import load_config
from appliance.db.models import Task
from appliance.tasks import records
from tests import procs
from tests.conftest import write_config

BACKENDS = ["sqlite", "postgresql"]


@dataclass
class TaskEnv:
    kind: str
    cfg: Any
    path: Path
    handle: Any
    client: Any
    headers: dict[str, dict[str, str]]
    user_ids: dict[str, int]
    logdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    # --- API --------------------------------------------------------------------------------
    def get(self, path: str, who: str = "alice", **kw: Any) -> Any:
        return self.client.simulate_get(path, headers={**self.headers[who], **kw.pop("headers", {})}, **kw)

    def post(self, path: str, body: Any = None, who: str = "alice", **kw: Any) -> Any:
        return self.client.simulate_post(path, json=body, headers={**self.headers[who], **kw.pop("headers", {})}, **kw)

    def submit(self, task_type: str, data: dict[str, Any] | None = None, who: str = "alice", **extra: Any) -> str:
        r = self.post("/tasks/submit", {"task_type": task_type, "data": data or {}, **extra}, who=who)
        assert r.status_code == 200, r.text
        return r.json["data"]["task_id"]

    def status(self, task_id: str, who: str = "admin") -> dict[str, Any]:
        r = self.get(f"/tasks/status/{task_id}", who=who)
        assert r.status_code == 200, r.text
        return r.json["data"]

    def wait(self, task_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"), timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status(task_id)
            if s["status"] in states:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still {s['status']} after {timeout}s (wanted {states}); logs:\n{self.logs()}")
            time.sleep(0.05)

    def wait_history(self, task_id: str, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """History rows are written in batches: wait until `n` are there."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.status(task_id)["history"]
            if len(h) >= n or time.monotonic() > deadline:
                return h
            time.sleep(0.05)

    # --- processes --------------------------------------------------------------------------
    def start(self, role: str = "worker", index: int = 0, wait: bool = True) -> subprocess.Popen:
        log = self.logdir / f"{role}-{index}-{len(self.procs)}.log"
        proc = procs.start_child(role, self.path, index, log=log)
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        if wait:
            deadline = time.monotonic() + 20
            while f"{role} ready" not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise AssertionError(f"{role} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{role} not ready:\n{log.read_text(errors='replace')}")
                time.sleep(0.05)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            procs.stop(p, timeout=10)
        self.procs.clear()

    def logs(self) -> str:
        out = []
        for p in self.procs:
            path = getattr(p, "log_path", None)
            if path and Path(path).exists():
                out.append(f"--- {path.name}\n" + Path(path).read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def task(self, task_id: str) -> Task:
        records.flush()
        return Task.get_by_id(task_id)


def make_env(kind: str, base: Path, request: pytest.FixtureRequest, **queue: Any) -> TaskEnv:
    sections: dict[str, Any] = {
        "queue": {
            "concurrency": 3,
            "worker_type": "process",
            "reaper_interval": 0.5,
            "callback_retries": 1,
            "callback_timeout": 2.0,
            **queue,
        },
        "auth": {"bcrypt_rounds": 10},
        "supervisor": {"grace_period": 5.0, "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0},
        "logging": {"format": "text", "level": "info"},
    }
    if kind == "postgresql":
        redis = request.getfixturevalue("redis_server")
        sections["database"] = {"url": request.getfixturevalue("pg_url"), "max_connections": 8}
        sections["redis"] = {"url": redis["url"], "key_prefix": f"{redis['prefix']}{secrets.token_hex(3)}:"}
    path = write_config(base / "data", **sections)
    cfg = load_config(path, env={})
    handle = dbmod.open_database(cfg)
    dbmod.migrate(handle)
    from appliance.api.app import create_app

    client = testing.TestClient(create_app(cfg, db=handle, check_responses=True, load_apps=False))
    settings = tokens.TokenSettings.from_config(cfg)
    headers: dict[str, dict[str, str]] = {}
    ids: dict[str, int] = {}
    for name, role in (("admin", "admin"), ("alice", "user"), ("bob", "user")):
        user = accounts.create_user(name, None, "correct-horse-battery", role=role, rounds=10)
        tok, _ = tokens.issue_access(
            settings, user_id=user.id, username=name, role=role, generation=user.token_generation, family="f" + name
        )
        headers[name] = {"Authorization": f"Bearer {tok}"}
        ids[name] = user.id
    logdir = base / "logs"
    logdir.mkdir(exist_ok=True)
    return TaskEnv(kind, cfg, path, handle, client, headers, ids, logdir)


def close_env(env: TaskEnv) -> None:
    env.stop_all()
    records.flush()
    if hasattr(env.handle, "close_all"):
        env.handle.close_all()
    else:
        env.handle.close()


@pytest.fixture(params=BACKENDS)
def tenv(request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh backend and API, no processes (tests start what they need)."""
    env = make_env(request.param, tmp_path, request)
    try:
        yield env
    finally:
        close_env(env)
