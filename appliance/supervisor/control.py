"""The control socket: how `appliance status` asks the running supervisor what it runs.

A unix stream socket at <data_dir>/run/control.sock, mode 0600 (only the
appliance's user may ask). A client sends one line ("status", or "processes" for the
snapshot alone) and reads one JSON document until the server closes. The server is a daemon thread that
reads the snapshot the arbiter's loop publishes each tick and adds what is
costly to gather only on request: cpu and memory of each process (psutil),
upstream health from balancer-state.json and the queue depth from the
database. It never blocks the arbiter's loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_PATH = 107  # sun_path


class NotRunning(Exception):
    """No appliance answers on this data dir."""


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def pss(pid: int) -> float | None:
    """Proportional set size in bytes (Linux smaps_rollup): shared pages count divided by their sharers."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return float(line.split()[1]) * 1024
    return None


def process_usage(pids: list[int], sample: float = 0.2) -> dict[int, dict[str, float]]:
    """cpu % (over `sample` seconds), rss and pss of each live pid."""
    import psutil

    procs: dict[int, Any] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.cpu_percent(None)
            procs[pid] = p
    time.sleep(sample)
    out: dict[int, dict[str, float]] = {}
    for pid, p in procs.items():
        with contextlib.suppress(psutil.Error):
            out[pid] = {"cpu": p.cpu_percent(None), "rss": float(p.memory_info().rss), "pss": pss(pid)}
    return out


class ControlServer:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]], extras: Callable[[], dict[str, Any]] | None = None):
        self.path = path
        self.snapshot = snapshot
        self.extras = extras
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        if len(str(self.path)) > MAX_PATH:
            log.warning("control socket path %s is too long for a unix socket; `appliance status` will not work", self.path)
            return False
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600 from the start, not chmod'ed after
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        if self._sock:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # a bad client must never stop the control thread
                    log.debug("control request failed", exc_info=True)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        request = conn.recv(1024).decode("utf-8", "replace").strip()
        if request == "processes":  # the monitor's sampler, every few seconds: the snapshot only, nothing costly
            conn.sendall(json.dumps({**self.snapshot(), "now": time.time()}, default=str).encode())
            return
        if request != "status":
            conn.sendall(json.dumps({"error": f"unknown request {request[:40]!r}; known: status, processes"}).encode())
            return
        doc = dict(self.snapshot())
        rows = [dict(r) for r in doc.get("processes", [])]
        me = os.getpid()
        usage = process_usage([r["pid"] for r in rows if r.get("pid")] + [me])
        now = time.time()
        for row in rows:
            row.update(usage.get(row.get("pid") or 0, {"cpu": None, "rss": None}))
            row["uptime"] = now - row["started"] if row.get("started") else None
        doc["processes"] = rows
        doc["supervisor"] = usage.get(me, {})
        doc["now"] = now
        if self.extras:
            with contextlib.suppress(Exception):
                doc.update(self.extras())
        conn.sendall(json.dumps(doc, default=str).encode())


def query(path: Path, timeout: float = 5.0, request: str = "status") -> dict[str, Any]:
    """Ask the supervisor on `path` ("status", or "processes": the cheap snapshot); NotRunning when nothing answers."""
    if not path.exists():
        raise NotRunning(f"no control socket at {path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(request.encode("ascii") + b"\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise NotRunning(f"nothing answers on {path} ({exc.strerror})") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise NotRunning(f"the appliance on {path} gave no readable answer") from None
