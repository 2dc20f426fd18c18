"""Is a starting child ready? One small probe per kind of readiness, each bounded by a short timeout.

- http: GET <path> at the child's loopback address answers 200 (api workers: /health/ping).
- tcp: the child's address accepts a connection (monitor).
  (Both once the address is known: a port the kernel picked is first announced by the child.)
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


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def http_ok(address: str, path: str = "/health/ping", timeout: float = 0.5) -> bool:
    """GET `path` at "host:port" answers 200."""
    host, port = _split(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"X-Request-ID": "supervisor-readiness"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def tcp_ok(address: str, timeout: float = 0.3) -> bool:
    """The address ("host:port") accepts a connection."""
    with contextlib.suppress(OSError), socket.create_connection(_split(address), timeout=timeout):
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
