"""The systemd notify protocol (sd_notify) without libsystemd.

When systemd starts us with Type=notify it sets NOTIFY_SOCKET to a unix
datagram socket (a path, or an abstract name written with a leading '@').
Each message is a few KEY=VALUE lines in one datagram: READY=1, STATUS=...,
WATCHDOG=1, RELOADING=1 (with MONOTONIC_USEC), STOPPING=1. With
WATCHDOG_USEC set (and WATCHDOG_PID unset or ours), systemd expects
WATCHDOG=1 at least that often; we send at half the interval. Without
NOTIFY_SOCKET every call is a no-op, and a failing send is logged once and
never stops the appliance.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes:
    """NOTIFY_SOCKET as an address for socket.sendto: '@name' is the abstract name '\\0name'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked for."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner.isdigit() and int(owner) != pid:
        return None
    return int(usec) / 1e6 / 2


class Notifier:
    """Sends notify messages to systemd (or to a test's socket)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = socket_address(raw) if raw else None
        self.watchdog: float | None = watchdog_interval(env, os.getpid()) if raw else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.set_inheritable(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            self._failed = False
            return True
        except OSError as exc:
            if not self._failed:  # once per failure streak, not every watchdog tick
                log.warning("cannot notify systemd: %s", exc)
            self._failed = True
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self, status: str = "reloading the configuration") -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def ping_due(self, now: float) -> bool:
        return self.watchdog is not None and now - self._last_ping >= self.watchdog

    def ping(self, now: float) -> None:
        """WATCHDOG=1; the caller only pings while all is well."""
        self._last_ping = now
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
