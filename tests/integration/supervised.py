"""Helpers to run a real `appliance run` on a free loopback port, stream GETs through it and read its status.

Only the balancer's port is planned: the api workers and the monitor listen where the kernel puts
them (the default), and `address(role)` / `monitor_port` ask the running appliance where that is.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import write_config
from tests.procs import appliance_cmd, free_port, stop

ROOT = Path(__file__).resolve().parents[2]


class Appliance:
    """One `appliance run` in a temp data dir; JSON log lines in `log`."""

    def __init__(self, tmp: Path, api_workers: int = 2, task_workers: int = 1, monitor: bool = False, env: dict | None = None, **sections):
        self.port = free_port()
        sup = {"grace_period": 10.0, "startup_timeout": 60.0, "heartbeat_interval": 1.0, **sections.pop("supervisor", {})}
        self.sections: dict[str, Any] = {
            "balancer": {"listen": f"127.0.0.1:{self.port}", "health_interval": 0.5, "access_log": False, **sections.pop("balancer", {})},
            "api": {"workers": api_workers, "threads": 4},
            "queue": {"workers": task_workers, "concurrency": 2},
            "monitor": {"enabled": monitor},
            "auth": {"bcrypt_rounds": 10},
            "supervisor": sup,
            **sections,
        }
        self.data = tmp / "data"
        self.config = write_config(self.data, **self.sections)
        self.log = tmp / "appliance.log"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            appliance_cmd(*args, "--config", str(self.config)), input=stdin, capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def start(self, wait: bool = True) -> Appliance:
        self.proc = subprocess.Popen(
            appliance_cmd("run", "--config", str(self.config)),
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        if wait:
            self.wait_for("appliance is up", timeout=90)
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop(self.proc, timeout=30)

    def lines(self) -> list[dict]:
        out = []
        for raw in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def messages(self, role: str = "supervisor") -> list[str]:
        return [e.get("message", "") for e in self.lines() if e.get("role") == role]

    def count(self, text: str) -> int:
        return sum(text in m for m in self.messages())

    def wait_for(self, text: str, timeout: float = 30.0, after: int = 0) -> str:
        """The first supervisor line containing `text` (skipping the first `after` such lines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages() if text in m]
            if len(found) > after:
                return found[after]
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no supervisor line with {text!r} within {timeout}s; log tail:\n{self.log.read_text()[-4000:]}")

    def status(self) -> dict:
        from appliance.supervisor.control import query

        return query(self.data / "run" / "control.sock")

    def addresses(self, role: str) -> dict[int, str]:
        """slot -> "127.0.0.1:PORT" of the live processes of a role that listen (api, monitor)."""
        rows = self.status()["processes"]
        return {r["slot"]: r["address"] for r in rows if r["role"] == role and r["pid"] and r["state"] == "up" and r["address"]}

    @property
    def monitor_port(self) -> int:
        """The loopback port the monitor listens on now (the kernel's pick, unless [monitor] port pins it)."""
        return int(self.addresses("monitor")[0].rsplit(":", 1)[1])

    def pids(self, role: str) -> dict[int, int]:
        """slot -> pid of the live processes of a role."""
        return {r["slot"]: r["pid"] for r in self.status()["processes"] if r["role"] == role and r["pid"] and r["state"] == "up"}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


class Stream:
    """GETs through the balancer from `threads` threads until stopped; failures are recorded with their time."""

    def __init__(self, port: int, path: str = "/health/ping", threads: int = 2):
        self.port, self.path = port, path
        self.ok = 0
        self.refused = 0
        self.failures: list[tuple[float, str]] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Stream:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(15)

    def _run(self) -> None:
        while not self.stopped.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                try:
                    conn.connect()
                except ConnectionRefusedError:  # nothing accepts (after a stop): not a request in flight
                    with self.lock:
                        self.refused += 1
                    time.sleep(0.05)
                    continue
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                with self.lock:
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self.failures.append((time.monotonic(), f"{resp.status} {body[:200]!r}"))
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            finally:
                conn.close()
            time.sleep(0.01)


def http_json(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def wait_until(predicate: Any, timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(step)
    return None


SIGNALS = {"term": signal.SIGTERM, "hup": signal.SIGHUP, "kill": signal.SIGKILL}
