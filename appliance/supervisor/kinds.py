"""The declarative table of child kinds: what the supervisor runs, how many, and how each is handled.

Each Kind says: the role, how many processes, how readiness is checked, whether
a dead one is restarted, whether it sits behind the balancer (taken out of
upstreams.json and drained before it stops), how it is replaced on SIGHUP
(started next to the old one, or stopped first because only one may run), and
whether it listens on loopback: at a fixed port for an index, or (port 0, the
default) at one the kernel picks, which the child announces and the arbiter
reads back (appliance/listen_address.py). The arbiter knows nothing about roles beyond this table,
so tests can run it with stand-in children.

Why each role is its own process (README, "What runs"): the balancer's event loop never
waits for Python work of a request and restarts alone while the supervisor holds the socket;
api workers use more than one CPU under the GIL and are replaced one at a time; task workers
run operator code that must not stall requests; the monitor's page and sampler never slow the
API. The scheduler (a tick a second, one row insert per cron slot) buys nothing from a process
of its own: while the monitor runs, its loop is a thread of the monitor's process (`jobs`,
roles.hosted_jobs: "housekeeping") and the scheduler count is 0; with [monitor] enabled = false
it is its own process as before.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from appliance import listen_address
from appliance.supervisor import roles

log = logging.getLogger(__name__)

Readiness = Literal["http", "balancer", "heartbeat", "tcp"]


@dataclass(frozen=True)
class Kind:
    role: str
    count: int
    readiness: Readiness
    command: Callable[[int], list[str]]
    port: Callable[[int], int] | None = None  # its loopback port for an index; 0: the kernel picks, the child announces it
    group: str | None = None  # upstream group in upstreams.json (api, monitor)
    drained: bool = False  # taken out of the balancer and drained before it stops
    replace: Literal["overlap", "stop_first", "never"] = "overlap"
    restart: bool = True
    listeners: bool = False  # gets the public listening sockets (APPLIANCE_LISTEN_FDS + pass_fds)
    ready_path: str = "/health/ping"  # for readiness "http"
    jobs: tuple[str, ...] = ()  # other roles whose loop its processes run in a thread (roles.hosted_jobs); shown in the status

    @property
    def listens(self) -> bool:
        """True when its processes serve HTTP on loopback (and so have an address)."""
        return self.port is not None

    def address(self, index: int) -> str | None:
        """The fixed address of process `index`, or None when it has none or the kernel picks its port."""
        port = self.port(index) if self.port else 0
        return f"127.0.0.1:{port}" if port else None


def child_command(role: str, index: int, log_format: str) -> list[str]:
    """The same executable re-run with a role: works from source and from a frozen binary."""
    if getattr(sys, "frozen", False):
        base = [sys.executable]
    else:
        base = [sys.executable, "-m", "appliance"]
    return [*base, "_child", role, "--index", str(index), "--log-format", log_format]


def template_command(fd: int, log_format: str) -> list[str]:
    """The template process (appliance/template.py), from the same executable; fd is its end of the socketpair."""
    base = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "appliance"]
    return [*base, "_template", "--fd", str(fd), "--log-format", log_format]


def appliance_kinds(cfg: Any, log_format: str, available: Callable[[str], bool] = roles.available) -> list[Kind]:
    """The table for a real appliance from its config; roles not in this build are left out with a log line."""

    def cmd(role: str) -> Callable[[int], list[str]]:
        return lambda index: child_command(role, index, log_format)

    monitor = 1 if cfg.monitor.enabled and available("monitor") else 0
    hosted = roles.hosted_jobs("monitor", cfg) if monitor else ()  # a monitor not in this build hosts nothing

    table = [
        Kind(
            role="api",
            count=cfg.api_workers,
            readiness="http",
            command=cmd("api"),
            port=lambda i: listen_address.port_for(cfg.api.base_port, i),
            group="api",
            drained=True,
        ),
        Kind(role="worker", count=cfg.queue.workers, readiness="heartbeat", command=cmd("worker")),
        # Its own process only when the monitor does not run its loop (see the module docstring).
        Kind(
            role="scheduler", count=0 if "scheduler" in hosted else 1, readiness="heartbeat", command=cmd("scheduler"), replace="stop_first"
        ),
        Kind(
            role="monitor",
            count=monitor,
            readiness="tcp",
            command=cmd("monitor"),
            port=lambda i: listen_address.port_for(cfg.monitor.port),
            group="monitor",
            replace="stop_first",
            jobs=hosted,
        ),
        # Last: it starts when the api workers are coming up, and on SIGHUP it is only replaced when its config changed.
        # Several ([balancer] processes) accept from the same inherited sockets; replaced one at a time.
        Kind(role="balancer", count=cfg.balancer_processes, readiness="balancer", command=cmd("balancer"), listeners=True),
    ]
    kinds = []
    for kind in table:
        if kind.count <= 0:
            continue
        if not available(kind.role):
            log.warning("role %s is not part of this build; it is left out", kind.role, extra={"fields": {"role_left_out": kind.role}})
            continue
        kinds.append(kind)
    return kinds
