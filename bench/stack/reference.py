"""The reference stack, started by the benchmark: nginx -> 3 gunicorn/Flask -> PostgreSQL, Celery worker + beat on Redis.

Process counts follow the appliance's where a role matches: one nginx worker
(one balancer process), three gunicorn instances of one gthread worker with 8
threads each (three api workers of 8 waitress threads), one prefork Celery
worker with 2 processes and one beat (two task worker processes and one
scheduler). Everything listens on loopback; the database is a fresh one on the
shared PostgreSQL server, dropped at stop; Redis keys carry a per-run prefix.

No process gets a session of its own: with the kernel's autogroup scheduling
(sched_autogroup_enabled, on by default) every session is one scheduling group
with an equal share of the CPU, so six sessions of the reference against the
appliance's one would hand the reference most of a busy machine. Both stacks
and the load generator stay in the benchmark's session: threads compete alike.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bcrypt
import psycopg2

from bench.stack import procs
from bench.tasks import PG_URL, REDIS_URL, _cleanup_redis, _pg_database
from tests.procs import free_range, stop, wait_port

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TEMPLATE = Path(__file__).with_name("nginx.conf.tmpl")
HEADERS = """            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;"""
USERNAME, PASSWORD = "bench", "bench-password-1"
API_INSTANCES, API_THREADS, TASK_PROCS, BCRYPT_ROUNDS = 3, 8, 2, 12


class ReferenceStack:
    """start() / stop(); the pids the scenarios read or kill; what a client needs (port, login)."""

    name = "reference"

    def __init__(self, tmp: Path):
        self.dir = tmp / "reference"
        self.dir.mkdir(parents=True)
        base = free_range(API_INSTANCES + 1)
        self.port, self.api_ports = base, [base + 1 + i for i in range(API_INSTANCES)]
        self.run_id = secrets.token_hex(3)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REF_REDIS_URL": REDIS_URL,
            "REF_KEY_PREFIX": f"refbench-{self.run_id}:",
            "REF_QUEUE": f"refbench-{self.run_id}",
            "REF_JWT_SECRET": secrets.token_urlsafe(32),
        }
        self.gunicorns: list[subprocess.Popen] = []
        self.nginx: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.beat: subprocess.Popen | None = None
        self._pg: Any = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> ReferenceStack:
        dsn, self._pg = _pg_database(PG_URL)
        self.env["REF_PG_DSN"] = dsn
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("REF_")})  # before reftasks is imported here
        self._create_user(dsn)
        for i, port in enumerate(self.api_ports):
            self.gunicorns.append(
                self._spawn(
                    f"api{i + 1}",
                    [
                        sys.executable,
                        "-m",
                        "gunicorn",
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--workers",
                        "1",
                        "--worker-class",
                        "gthread",
                        "--threads",
                        str(API_THREADS),
                        "--keep-alive",
                        "5",
                        "--timeout",
                        "120",
                        "--log-level",
                        "warning",
                        "bench.stack.refapp:app",
                    ],
                    REF_INSTANCE=f"api{i + 1}",
                    REF_THREADS=str(API_THREADS),
                )  # fmt: skip
            )
        celery = [sys.executable, "-m", "celery", "-A", "bench.stack.reftasks"]
        self.worker = self._spawn(
            "celery-worker",
            [*celery, "worker", "--pool", "prefork", "--concurrency", str(TASK_PROCS), "-Q", self.env["REF_QUEUE"], "--loglevel", "INFO"],
        )
        self.beat = self._spawn("celery-beat", [*celery, "beat", "--schedule", str(self.dir / "beat-schedule"), "--loglevel", "INFO"])
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=30s;" for p in self.api_ports)
        ndir = self.dir / "nginx"
        ndir.mkdir()
        conf = TEMPLATE.read_text().format(workers=1, dir=ndir, servers=servers, port=self.port, headers=HEADERS)
        (ndir / "nginx.conf").write_text(conf)
        self.nginx = subprocess.Popen(
            [NGINX, "-c", str(ndir / "nginx.conf"), "-p", str(ndir), "-g", "daemon off;"],
            stdout=open(self.dir / "nginx.log", "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        for proc, port in zip(self.gunicorns, self.api_ports, strict=True):
            wait_port(port, timeout=60, proc=proc)
        wait_port(self.port, proc=self.nginx)
        self._wait_log("celery-worker", "ready.", self.worker)
        return self

    def stop(self) -> None:
        if self.nginx is not None:
            stop(self.nginx, signal.SIGQUIT)
        for proc in [self.beat, self.worker, *self.gunicorns]:
            if proc is not None:
                stop(proc, timeout=20)
        with contextlib.suppress(Exception):
            _cleanup_redis(self.env["REF_KEY_PREFIX"])
        if self._pg is not None:
            conn, name = self._pg
            with contextlib.suppress(Exception), conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()

    def _spawn(self, name: str, cmd: list[str], **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            cmd, env={**self.env, **extra}, cwd=ROOT, stdout=open(self.dir / f"{name}.log", "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def _wait_log(self, name: str, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
        log = self.dir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while text not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def _create_user(self, dsn: str) -> None:
        from bench.stack.refapp import SCHEMA

        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
            cur.execute("INSERT INTO users (username, email, password_hash) VALUES (%s, %s, %s)", (USERNAME, "bench@example.com", hashed))
        conn.close()

    # --- what the scenarios use -----------------------------------------------------------------

    @property
    def credentials(self) -> dict[str, str]:
        return {"username": USERNAME, "password": PASSWORD}

    def roots(self) -> list[int]:
        """Every process of the stack is one of these or under one."""
        return [p.pid for p in [self.nginx, *self.gunicorns, self.worker, self.beat] if p is not None]

    def api_worker_pid(self) -> int:
        """A gunicorn worker (its master starts another), the peer of one appliance api worker."""
        return procs.children(self.gunicorns[0].pid)[0]

    def api_worker_pids(self) -> set[int]:
        return {pid for g in self.gunicorns for pid in procs.children(g.pid)}

    def task_worker_pid(self) -> int:
        """One prefork child of the Celery worker, the peer of one appliance task worker."""
        assert self.worker is not None
        return procs.children(self.worker.pid)[0]

    def task_outcomes(self, ids: list[str]) -> dict[str, tuple[str, float | None]]:
        """task id -> (state, finished unix time) as the result backend has them now."""
        from bench.stack import reftasks

        out: dict[str, tuple[str, float | None]] = {}
        backend = reftasks.app.backend
        metas = backend.mget([backend.get_key_for_task(i) for i in ids])
        for task_id, raw in zip(ids, metas, strict=True):
            if raw is None:
                out[task_id] = ("pending", None)
                continue
            meta = backend.decode_result(raw)
            state = str(meta.get("status", "PENDING")).lower()
            result = meta.get("result")
            done = result.get("finished") if state == "success" and isinstance(result, dict) else None
            out[task_id] = ("succeeded" if state == "success" else state, done)
        return out
