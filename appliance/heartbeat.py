"""The heartbeat of every child process: a daemon thread started by supervisor/roles.run_child.

Every `supervisor.heartbeat_interval` seconds it
- touches the file named by APPLIANCE_HEARTBEAT_FILE (set by the supervisor),
  which is how the supervisor sees that a child is alive (a child silent
  for `heartbeat_timeout` is killed and restarted), and how a worker or the
  scheduler tells it has booted;
- upserts the process's NodeHeartbeat row (node_id "host:role:index", pid,
  status, cpu %, rss) that /health/nodes and the status page read, through a
  driver connection of its own (appliance/heartbeat_row.py: never the role's
  connections, and no peewee, so the balancer loads none);
- checks that the supervisor that started it is still its parent; if the
  supervisor died (SIGKILL), the child stops itself instead of living on as
  an orphan that holds ports.
A failed heartbeat write is logged (once per failure streak), never fatal.
Roles may call `set_status("draining")` etc. to show what they are doing.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from appliance.contract import HEARTBEAT_FILE_ENV as FILE_ENV
from appliance.contract import SUPERVISOR_PID_ENV as PARENT_ENV

log = logging.getLogger(__name__)

_status = "starting"
_info: dict[str, Any] = {}


def set_status(status: str) -> None:
    """What this process is doing, as shown in /health/nodes (starting, running, draining, stopping)."""
    global _status
    _status = status


def set_info(**values: Any) -> None:
    """Facts shown in this process's /health/nodes info from the next beat on (e.g. its listening address)."""
    _info.update(values)


def node_id(cfg: Any, role: str, index: int) -> str:
    return f"{host_name(cfg)}:{role}:{index}"


def host_name(cfg: Any) -> str:
    return cfg.server.node_name or socket.gethostname()


class Heartbeat(threading.Thread):
    def __init__(self, cfg: Any, role: str, index: int, env: dict[str, str] | None = None):
        super().__init__(name="heartbeat", daemon=True)
        env = dict(os.environ) if env is None else env
        self.cfg = cfg
        self.role = role
        self.index = index
        self.interval = cfg.supervisor.heartbeat_interval
        self.file = env.get(FILE_ENV) or None
        parent = env.get(PARENT_ENV, "")
        self.parent = int(parent) if parent.isdigit() else None
        self.node_id = node_id(cfg, role, index)
        self.host = host_name(cfg)
        self.started_at = _utcnow()
        self.stopped = threading.Event()
        self._db: Any = None
        self._failing_since: float | None = None
        self._orphaned_at: float | None = None
        self._process: Any = None

    def run(self) -> None:
        while True:
            self.beat()
            if self.stopped.wait(self.interval):
                return

    def beat(self, status: str | None = None) -> None:
        global _status
        self._touch()
        self._check_parent()
        self._write(status or _status)
        if _status == "starting":
            _status = "running"

    def stop(self, status: str = "stopped") -> None:
        """Final beat on the way out (atexit), so the row says the process ended."""
        self.stopped.set()
        self._write(status)

    def _touch(self) -> None:
        if not self.file:
            return
        try:
            with open(self.file, "a"):
                pass
            os.utime(self.file)
        except OSError as exc:
            log.warning("cannot touch heartbeat file %s: %s", self.file, exc)

    def _check_parent(self) -> None:
        if self.parent is None or os.getppid() == self.parent:
            return
        now = time.monotonic()
        if self._orphaned_at is None:
            self._orphaned_at = now
            log.error("the supervisor (pid %d) is gone: stopping", self.parent)
            os.kill(os.getpid(), signal.SIGTERM)
        elif now - self._orphaned_at > self.cfg.supervisor.grace_period + 5:
            os._exit(1)  # the role did not stop on SIGTERM; an orphan must not hold ports forever

    def _sample(self) -> tuple[float, int]:
        try:
            import psutil

            if self._process is None:
                self._process = psutil.Process()
                self._process.cpu_percent(None)
            return float(self._process.cpu_percent(None)), int(self._process.memory_info().rss)
        except Exception:  # psutil can fail in odd containers; the heartbeat itself matters more
            return 0.0, 0

    def _write(self, status: str) -> None:
        cpu, rss = self._sample()
        now = _utcnow()
        values = {
            "node_id": self.node_id,
            "role": self.role,
            "host": self.host,
            "pid": os.getpid(),
            "status": status,
            "cpu": cpu,
            "rss": rss,
            "started_at": self.started_at,
            "last_heartbeat": now,
            "info": {"index": self.index, **_info},
        }
        try:
            if self._db is None:
                from appliance.heartbeat_row import HeartbeatRow

                self._db = HeartbeatRow(self.cfg)
            self._db.upsert(values)
        except Exception as exc:  # never fatal: the role keeps serving without its row
            if self._failing_since is None:
                log.warning("cannot write the heartbeat of %s: %s", self.node_id, str(exc).strip() or type(exc).__name__)
                self._failing_since = time.monotonic()
            return
        if self._failing_since is not None:
            log.info("heartbeats of %s are written again", self.node_id)
            self._failing_since = None


def _utcnow() -> Any:
    from appliance.times import utcnow

    return utcnow()


def start(cfg: Any, role: str, index: int) -> Heartbeat:
    """Start the heartbeat thread of this process (first beat at once)."""
    hb = Heartbeat(cfg, role, index)
    hb.start()
    atexit.register(hb.stop)
    return hb
