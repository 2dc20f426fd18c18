"""Helpers for tests that run real processes on real loopback sockets.

Only processes started here are ever stopped, by pid. Every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out lately. A port is only checked free, not held, until the test binds it, so
# without this two calls made before either port is bound (a Stack's upstream range and its
# listen port, a redirect port picked before them) could return the same port. The balancer
# binding second then fails to boot, and a client that connected to its listener in between
# is reset (a CI flake: ConnectionResetError on the first TLS handshake of tls_stack).
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=1024)


def free_range(n: int) -> int:
    """A base port with n free consecutive ports after it, on 127.0.0.1.

    Ports come from below the ephemeral range, so the source port of some
    outgoing connection cannot take one between now and when a test binds it
    (workers use base_port + i; a rolling restart uses spare ports above).
    No port of the range was handed out by a recent call (the last 1024 ports),
    so ports asked for one after the other are distinct even before any is bound.
    """
    top = min(_ephemeral_low(), 65000) - n
    recent = set(_HANDED_OUT)
    for _ in range(200):
        base = random.randrange(20000, top)
        if recent.intersection(range(base, base + n)):
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            _HANDED_OUT.extend(range(base, base + n))
            return base
    raise RuntimeError("no free port range below the ephemeral range")


def free_port(n: int = 1) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the first of n free consecutive ones)."""
    return free_range(n)


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts on host:port; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def appliance_cmd(*args: str) -> list[str]:
    """The command line of the appliance from this source tree."""
    return [sys.executable, "-m", "appliance", *args]


def start_child(role: str, config: Path, index: int = 0, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start `appliance _child ROLE` as a real process; its output goes to `log` (or is discarded)."""
    full_env = {**os.environ, **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        appliance_cmd("_child", role, "--index", str(index), "--config", str(config)),
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Stop a process we started (by pid): `sig`, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Context manager that always stops `proc` on exit."""
    try:
        yield proc
    finally:
        stop(proc)
