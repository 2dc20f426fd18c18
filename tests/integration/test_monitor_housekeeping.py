"""The monitor's process as a real `appliance _child monitor`, running the scheduler's loop in a thread ("housekeeping").

SIGTERM ends both with exit 0; a scheduler thread that dies stops the process with exit 1 (so the
supervisor restarts it); while the database cannot be used the scheduler thread retries with backoff
and the monitor keeps serving, and once the database is there the scheduler starts.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import PG_URL, _drop, _with_db
from tests.procs import free_port, running, start_child, stop, wait_port

ROOT = Path(__file__).resolve().parents[2]

# The real `_child monitor`, with the stand-in loop of tests/integration/standins/jobs.py in the scheduler's place.
WITH_A_BREAKING_JOB = """
import sys
from appliance.supervisor import roles
roles.JOBS["scheduler"] = "tests.integration.standins.jobs:breaks"
from appliance.cli import main
sys.exit(main(["_child", "monitor", "--config", sys.argv[1]]))
"""


def lines(log: Path) -> list[dict]:
    out = []
    for raw in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def wait_line(log: Path, message: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in lines(log) if e.get("message", "").startswith(message)]
        if found:
            return found[0]
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no line {message!r} within {timeout}s:\n{log.read_text()[-3000:]}")


def ping(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ping", timeout=5) as r:
        return r.status


def test_sigterm_stops_the_monitor_and_its_scheduler_thread_with_exit_0(make_config, tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(monitor={"port": port})
    log = tmp_path / "monitor.log"
    with running(start_child("monitor", Path(cfg.source), log=log)) as proc:
        wait_port(port, proc=proc)
        ready = wait_line(log, "scheduler ready", proc=proc)
        assert ready["role"] == "monitor" and ready["pid"] == proc.pid and ready["hosted"] is True
        assert ping(port) == 200
        assert stop(proc) == 0
    stopped = [e for e in lines(log) if e.get("message") == "scheduler stopped"]
    assert len(stopped) == 1 and stopped[0]["fired"] == 0 and stopped[0]["pid"] == proc.pid


def test_with_the_monitor_disabled_a_monitor_started_by_hand_runs_no_scheduler(make_config, tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(monitor={"port": port, "enabled": False})
    log = tmp_path / "monitor.log"
    with running(start_child("monitor", Path(cfg.source), log=log)) as proc:
        wait_port(port, proc=proc)
        assert ping(port) == 200
        time.sleep(1.5)
        assert stop(proc) == 0
    assert not [e for e in lines(log) if "scheduler" in e.get("message", "")]


def test_a_scheduler_thread_that_dies_stops_the_monitor_with_exit_1(make_config, tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(monitor={"port": port})
    log = tmp_path / "monitor.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WITH_A_BREAKING_JOB, str(cfg.source)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    with running(proc):
        wait_port(port, proc=proc)  # it serves first: the loop breaks a second later
        assert proc.wait(15) == 1
    died = wait_line(log, "the scheduler thread died")
    assert "RuntimeError: the stand-in loop broke" in died["message"] and died["role"] == "monitor"


def test_postgresql_away_at_start_the_scheduler_retries_with_backoff_while_the_page_serves(make_config, tmp_path: Path, _pg_admin) -> None:
    import psycopg2

    name = f"appliance_test_{secrets.token_hex(4)}"  # not created yet: connecting fails until the test creates it
    port = free_port()
    cfg = make_config(monitor={"port": port}, database={"url": _with_db(PG_URL, name), "max_connections": 8})
    log = tmp_path / "monitor.log"

    def retries() -> list[dict]:
        return [e for e in lines(log) if e.get("message", "").startswith("scheduler cannot use the database")]

    try:
        with running(start_child("monitor", Path(cfg.source), log=log)) as proc:
            wait_port(port, proc=proc)
            deadline = time.monotonic() + 15
            while len(retries()) < 2:
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            first, second = retries()[:2]
            assert name in first["message"] and (first["failures"], second["failures"]) == (1, 2)
            assert (first["retry_in"], second["retry_in"]) == (1.0, 2.0)  # backing off, not a hot loop
            assert ping(port) == 200 and proc.poll() is None  # the monitor keeps serving meanwhile
            assert not [e for e in lines(log) if e.get("message") == "scheduler ready"]
            with _pg_admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
            reached = wait_line(log, "scheduler reached the database", timeout=40, proc=proc)
            assert reached["failures"] >= 2
            wait_line(log, "scheduler ready", timeout=10, proc=proc)
            assert stop(proc, signal.SIGTERM) == 0
        # Started by hand (no supervisor migrated first), it found the database empty and migrated it.
        conn = psycopg2.connect(_with_db(PG_URL, name), connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('schedule')")
                assert cur.fetchone()[0] is not None
        finally:
            conn.close()
    finally:
        _drop(_pg_admin, name)
