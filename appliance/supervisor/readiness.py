"""Is a starting child ready? One small probe per kind of readiness, each bounded by a short timeout.

- http: GET <path> on the child's loopback port answers 200 (api workers: /health/ping).
- tcp: the child's port accepts a connection (monitor).
- balancer: the balancer wrote run/balancer-state.json since it started (the
  supervisor holds the listening socket, so "it accepts" proves nothing);
  when the state names a pid, it must be this child's.
- heartbeat: the child's heartbeat thread (started by roles.run_child once the
  role's module is imported) touched its file, and it stayed up a moment.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
from pathlib import Path

MIN_UP = 0.25  # seconds a heartbeat-ready child must stay up before it counts


def http_ok(port: int, path: str = "/health/ping", timeout: float = 0.5) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"X-Request-ID": "supervisor-readiness"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def tcp_ok(port: int, timeout: float = 0.3) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout):
        return True
    return False


def written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def balancer_ready(state_path: Path, started_wall: float, pid: int) -> bool:
    if not written_since(state_path, started_wall):
        return False
    import json

    try:
        raw = json.loads(state_path.read_bytes())
    except (OSError, ValueError):
        return False
    owner = raw.get("pid") if isinstance(raw, dict) else None
    return owner is None or owner == pid


def heartbeat_ready(heartbeat_path: Path, started_wall: float, up_for: float) -> bool:
    return up_for >= MIN_UP and written_since(heartbeat_path, started_wall - 1.0)
