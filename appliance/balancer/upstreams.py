"""Which upstreams exist, which route goes where, and the control channel with the supervisor.

Upstream groups come from <data_dir>/run/upstreams.json, written by the
supervisor (write tmp + os.replace) and announced with SIGUSR1; the file's
mtime is also polled as a fallback. Its shape:
  {"version": 3, "groups": {"api": [{"address": "127.0.0.1:40113", "weight": 1, "state": "up"}],
                            "monitor": [{"address": "127.0.0.1:40127", "weight": 1, "state": "up"}]}}
(the ports the kernel picked for each child, which the supervisor learnt from it).
A "draining" upstream gets no new requests; one that disappears from the file
is drained and removed once nothing is in flight. Without the file (a
standalone balancer) the groups are the api workers at 127.0.0.1:[api]
base_port + i and the monitor at [monitor] port, when those are pinned (without
a supervisor nobody knows a port the kernel picked). Remote upstreams of
[balancer] upstreams are added to their group either way.

The balancer answers in <data_dir>/run/balancer-state.json (balancer-state-N.json
for process N > 0 of [balancer] processes; atomically, at most
every 0.5 s and after each reload): the last applied version and, per group,
every upstream's state, in-flight count, requests and failures, so the
supervisor knows when a draining worker has finished.

Routes: "/" goes to the api group, /status and /metrics to the monitor group
when there is one, plus [balancer] routes; the longest matching prefix wins. A
prefix ending in "/" matches its subtree, any other the exact path or below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from appliance.balancer import pool
from appliance.balancer.picker import Group, Upstream
from appliance.balancer.upstream_state import DRAINING, Health
from appliance.contract import BALANCER_STATE_FILE, RUN_DIR, UPSTREAMS_FILE, balancer_state_file

log = logging.getLogger(__name__)

CONTROL_FILE = f"{RUN_DIR}/{UPSTREAMS_FILE}"
STATE_FILE = f"{RUN_DIR}/{BALANCER_STATE_FILE}"


class UpstreamTable:
    """The upstream groups and routes of this balancer."""

    def __init__(self, cfg: Any, index: int = 0):
        self.cfg = cfg
        b = cfg.balancer
        self._health = (b.health_rise, b.health_fall, b.max_fails, b.fail_timeout)
        self.groups: dict[str, Group] = {}
        self.routes: list[tuple[str, str, Group]] = []  # (exact, subtree prefix, group), longest first
        self.version = 0
        self.control_path = cfg.path(CONTROL_FILE)
        # Each balancer process ([balancer] processes) answers in its own file; the first in STATE_FILE.
        self.state_path = cfg.path(f"{RUN_DIR}/{balancer_state_file(index)}")
        self._mtime: float | None = None
        self._last_state = b""
        self._state_written = 0.0
        self.retired: list[Upstream] = []  # removed since the last metrics flush (their last counts)

    # -- which upstreams ------------------------------------------------------------------
    def standalone(self) -> dict[str, Any]:
        """The local groups without a supervisor: the pinned ports of [api] base_port and [monitor] port."""
        cfg = self.cfg
        base = cfg.api.base_port
        groups: dict[str, list[dict[str, Any]]] = {
            "api": [{"address": f"127.0.0.1:{base + i}", "weight": 1, "state": "up"} for i in range(cfg.api_workers)] if base else []
        }
        if not base:
            log.warning(
                "no %s and [api] base_port = 0: no local api workers; pin [api] base_port to run without the supervisor", CONTROL_FILE
            )
        if cfg.monitor.enabled and cfg.monitor.port:
            groups["monitor"] = [{"address": f"127.0.0.1:{cfg.monitor.port}", "weight": 1, "state": "up"}]
        return {"version": 0, "groups": groups}

    def load(self, force: bool = False) -> bool:
        """Read the control file when it changed (or the standalone set the first time); True when applied."""
        try:
            mtime = self.control_path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._mtime is None and not self.groups:
                self.apply(self.standalone())
                self._mtime = -1
                return True
            return False
        if mtime == self._mtime and not force:
            return False
        try:
            spec = orjson.loads(self.control_path.read_bytes())
            self.apply(spec)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("cannot apply %s: %s; keeping the current upstreams", self.control_path, exc)
            return False
        self._mtime = mtime
        return True

    def apply(self, spec: dict[str, Any]) -> None:
        """Make the groups match `spec` (plus the configured remote upstreams)."""
        wanted: dict[str, dict[str, dict[str, Any]]] = {}
        for gname, members in spec.get("groups", {}).items():
            wanted[gname] = {m["address"]: m for m in members}
        for remote in self.cfg.balancer.upstreams:
            wanted.setdefault(remote.group, {})[remote.address] = {"address": remote.address, "weight": remote.weight, "state": "up"}
        for gname, members in wanted.items():
            group = self.groups.get(gname)
            if group is None:
                group = self.groups[gname] = Group(gname)
            for address, m in members.items():
                weight = int(m.get("weight", 1) or 1)
                up = group.find(address)
                if up is None:
                    up = Upstream(address, weight, gname, Health(*self._health))
                    group.add(up)
                    log.info("upstream added", extra={"fields": {"group": gname, "upstream": address}})
                elif up.weight != weight:
                    up.set_weight(weight)
                up.removed = False
                if m.get("state", "up") == "draining":
                    if up.health.drain():
                        log.info("upstream draining", extra={"fields": {"group": gname, "upstream": address}})
                else:
                    up.health.undrain()
        for gname, group in self.groups.items():
            keep = wanted.get(gname, {})
            for up in group.upstreams:
                if up.address not in keep:
                    up.health.drain()
                    up.removed = True  # taken out of the group once idle (sweep)
        self.version = int(spec.get("version", 0))
        self._build_routes()
        self.write_state(force=True)

    def _build_routes(self) -> None:
        table: dict[str, str] = {"/": "api"}
        if self.groups.get("monitor") and self.groups["monitor"].upstreams:
            table["/status"] = "monitor"
            table["/metrics"] = "monitor"
        for r in self.cfg.balancer.routes:
            table[r.prefix] = r.group
        routes = []
        for prefix, gname in table.items():
            group = self.groups.get(gname)
            if group is None:
                group = self.groups[gname] = Group(gname)  # a route to an empty group answers 503
            subtree = prefix if prefix.endswith("/") else prefix + "/"
            routes.append((prefix, subtree, group))
        routes.sort(key=lambda r: len(r[0]), reverse=True)
        self.routes = routes

    def route(self, path: str) -> Group | None:
        """The group serving `path` (longest matching prefix)."""
        for exact, subtree, group in self.routes:
            if path == exact or path.startswith(subtree):
                return group
        return None

    # -- upkeep (the server's sweeper) ------------------------------------------------
    def sweep(self, now: float, idle_before: float) -> None:
        """End ejections that ran out, drop removed upstreams once idle, close stale idle connections."""
        for group in self.groups.values():
            for up in list(group.upstreams):
                up.health.tick(now)
                if up.removed and up.active == 0:
                    pool.close_idle(up)
                    group.remove(up)
                    self.retired.append(up)
                    log.info("upstream removed", extra={"fields": {"group": group.name, "upstream": up.address}})
                elif up.idle:
                    pool.close_idle(up, older_than=idle_before)
                    if up.state == DRAINING:
                        pool.close_idle(up)

    def take_retired(self) -> list[Upstream]:
        """Upstreams removed since the last call (for the metrics flush)."""
        retired, self.retired = self.retired, []
        return retired

    def state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "pid": os.getpid(),
            "upstreams": {
                gname: [
                    {"address": u.address, "state": u.state, "active": u.active, "requests": u.requests, "failures": u.failures}
                    for u in group.upstreams
                ]
                for gname, group in self.groups.items()
            },
        }

    def write_state(self, force: bool = False) -> None:
        """Write balancer-state.json when it changed (at most every 0.5 s unless forced)."""
        now = time.monotonic()
        if not force and now - self._state_written < 0.5:
            return
        data = orjson.dumps(self.state())
        if data == self._last_state and not force:
            return
        path: Path = self.state_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)
            return
        self._last_state = data
        self._state_written = now


async def probe(up: Upstream, timeout: float) -> bool:
    """One active check: GET /health/ping answered with a status below 500."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(up.host, up.port)
            writer.write(
                b"GET /health/ping HTTP/1.1\r\nHost: " + up.host_header + b"\r\nConnection: close\r\nUser-Agent: appliance-balancer\r\n\r\n"
            )
            line = await reader.readline()
        parts = line.split(b" ", 2)
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit() and int(parts[1]) < 500
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def check_all(registry: UpstreamTable, timeout: float) -> None:
    """Probe every upstream once, concurrently, and feed the results to their health."""
    ups = [u for g in registry.groups.values() for u in g.upstreams if not u.removed]
    if not ups:
        return
    results = await asyncio.gather(*(probe(u, timeout) for u in ups))
    now = time.monotonic()
    for up, ok in zip(ups, results, strict=True):
        if up.health.check_result(ok, now):
            log.info(
                "upstream %s is now %s",
                up.address,
                up.state,
                extra={"fields": {"group": up.group, "upstream": up.address, "state": up.state}},
            )
