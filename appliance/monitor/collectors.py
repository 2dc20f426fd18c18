"""What the monitor samples from the host, the supervisor and the shared metrics.

Each collector is an object with `sample(now) -> dict` that keeps what it needs
between samples (psutil Process objects so cpu % is measured over the interval
without sleeping, previous counter totals for rates). None of them raises: a
source that cannot be read gives {"error": "..."} so the page shows why.

- ProcessCollector: every child of the supervisor (control socket "processes"
  request: role, index, pid, state, restarts, jobs) plus psutil's cpu, RSS, PSS,
  threads and open files of each pid.
- HostCollector: cpu, memory, disk of the data dir, load, network bytes/s.
- TrafficCollector: the balancer's and the API's counters from the shared
  metrics files (appliance/metrics.py): requests/s, status classes, latency
  percentiles over the last `window` seconds, per upstream, rate-limit and
  auth rejections, the API's login events.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from pathlib import Path
from typing import Any

import psutil

from appliance import metrics
from appliance.monitor.history import Rates, quantile
from appliance.supervisor import control


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


class ProcessCollector:
    def __init__(self, run_dir: Path):
        self.socket = control.socket_path(run_dir)
        self._procs: dict[int, psutil.Process] = {}

    def _usage(self, pid: int) -> dict[str, Any]:
        p = self._procs.get(pid)
        try:
            if p is None:
                p = self._procs[pid] = psutil.Process(pid)
                p.cpu_percent(None)  # the first call only starts the measurement
            with p.oneshot():
                mem = p.memory_full_info()
                return {
                    "cpu": p.cpu_percent(None),
                    "cpu_seconds": sum(p.cpu_times()[:2]),
                    "rss": mem.rss,
                    "pss": getattr(mem, "pss", None),
                    "threads": p.num_threads(),
                    "open_files": p.num_fds(),
                }
        except psutil.Error:
            self._procs.pop(pid, None)
            return {}

    def sample(self, now: float) -> dict[str, Any]:
        try:
            snap = control.query(self.socket, timeout=2.0, request="processes")
        except (control.NotRunning, OSError) as exc:
            return {"rows": [], **_error(exc)}
        rows = []
        pids = {os.getpid()}
        for r in snap.get("processes", []):
            pid = r.get("pid")
            row = {
                "role": r.get("role"),
                "index": r.get("index"),
                "pid": pid,
                "state": r.get("state"),
                "restarts": r.get("restarts", 0),
                "uptime": round(now - r["started"], 1) if r.get("started") else None,
                "exit_status": r.get("exit_status"),
                "jobs": r.get("jobs") or [],  # other roles' loops it runs (the monitor: the scheduler's)
            }
            if pid:
                pids.add(pid)
                row.update(self._usage(pid))
            rows.append(row)
        supervisor = snap.get("pid")
        if supervisor:
            pids.add(supervisor)
            rows.insert(
                0,
                {
                    "role": "supervisor",
                    "index": 0,
                    "pid": supervisor,
                    "state": "up",
                    "restarts": 0,
                    "uptime": round(now - snap["started"], 1) if snap.get("started") else None,
                    **self._usage(supervisor),
                },
            )
        for pid in list(self._procs):  # forget processes that are gone so the cache stays bounded
            if pid not in pids:
                self._procs.pop(pid, None)
        return {"rows": rows, "phase": snap.get("phase"), "healthy": snap.get("healthy")}


class HostCollector:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._net = Rates()
        psutil.cpu_percent(None)

    def sample(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"cpu": psutil.cpu_percent(None), "cpus": psutil.cpu_count() or 1}
        vm = psutil.virtual_memory()
        out["memory"] = {"total": vm.total, "available": vm.available, "percent": vm.percent}
        try:
            du = psutil.disk_usage(str(self.data_dir))
            out["disk"] = {
                "total": du.total,
                "free": du.free,
                "used": du.used,
                "percent": du.percent,
                "free_percent": round(100.0 - du.percent, 1),
            }
        except OSError as exc:
            out["disk"] = _error(exc)
        with contextlib.suppress(OSError):
            out["load"] = [round(x, 2) for x in os.getloadavg()]
        try:
            net = psutil.net_io_counters()
            rates = self._net.update(now, {"rx": float(net.bytes_recv), "tx": float(net.bytes_sent)})
            out["network"] = {"rx_bytes_per_s": round(rates["rx"], 1), "tx_bytes_per_s": round(rates["tx"], 1)}
        except (OSError, AttributeError) as exc:
            out["network"] = _error(exc)
        return out


def _families() -> dict[str, Any]:
    return {f.name: f for f in metrics.collect()}


def _by(family: Any, suffix: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Sum of a family's samples named <family><suffix>, keyed by the given label values."""
    out: dict[tuple[str, ...], float] = {}
    if family is None:
        return out
    name = family.name + suffix
    for s in family.samples:
        if s.name == name:
            key = tuple(s.labels.get(x, "") for x in labels)
            out[key] = out.get(key, 0.0) + s.value
    return out


class TrafficCollector:
    """Rates and percentiles from the shared metrics; `window` seconds of histogram deltas for the percentiles."""

    def __init__(self, window: float = 30.0, interval: float = 2.0):
        self._rates = Rates()
        self._buckets: deque[dict[float, float]] = deque(maxlen=max(2, int(window / interval) + 1))

    def sample(self, now: float) -> dict[str, Any]:
        try:
            fam = _families()
        except Exception as exc:  # a torn metrics file: report it, sample again next time
            return _error(exc)
        status = _by(fam.get("appliance_balancer_requests"), "_total", "status")
        up_req = _by(fam.get("appliance_balancer_upstream_requests"), "_total", "group", "upstream")
        up_fail = _by(fam.get("appliance_balancer_upstream_failures"), "_total", "group", "upstream")
        limited = _by(fam.get("appliance_balancer_rate_limited"), "_total", "zone")
        auth_fail = _by(fam.get("appliance_balancer_auth_failures"), "_total", "code")
        auth_events = _by(fam.get("appliance_api_auth_events"), "_total", "kind")
        totals: dict[Any, float] = {("status", k[0]): v for k, v in status.items()}
        totals.update({("up", *k): v for k, v in up_req.items()})
        totals.update({("upfail", *k): v for k, v in up_fail.items()})
        totals.update({("zone", k[0]): v for k, v in limited.items()})
        totals.update({("auth", k[0]): v for k, v in auth_fail.items()})
        totals.update({("event", k[0]): v for k, v in auth_events.items()})
        rates = self._rates.update(now, totals)

        classes = {c: 0.0 for c in ("2xx", "3xx", "4xx", "5xx")}
        for (kind, *rest), r in rates.items():
            if kind == "status" and rest[0][:1] in "2345":
                classes[rest[0][0] + "xx"] += r
        rps = sum(classes.values())
        return {
            "requests_per_s": round(rps, 2),
            "requests_total": sum(status.values()),
            "classes_per_s": {k: round(v, 2) for k, v in classes.items()},
            "error_ratio": round(classes["5xx"] / rps, 4) if rps else 0.0,
            "latency": self._latency(fam.get("appliance_balancer_upstream_latency_seconds")),
            "upstreams": self._upstreams(fam, rates),
            "rate_limited_per_s": {k[1]: round(v, 2) for k, v in rates.items() if k[0] == "zone"},
            "rate_limited_total": {k[0]: v for k, v in limited.items()},
            "auth_failures_per_s": {k[1]: round(v, 2) for k, v in rates.items() if k[0] == "auth"},
            "auth_failures_total": {k[0]: v for k, v in auth_fail.items()},
            "login_events_total": {k[0]: v for k, v in auth_events.items()},
        }

    def _latency(self, family: Any) -> dict[str, float | None]:
        """p50/p95/p99 in ms of the api group's answers over the window (None without traffic)."""
        cumulative: dict[float, float] = {}
        for (le, group), v in _by(family, "_bucket", "le", "group").items():
            if group == "api":
                cumulative[float(le)] = cumulative.get(float(le), 0.0) + v
        self._buckets.append(cumulative)
        first = self._buckets[0]
        delta = [(le, max(0.0, v - first.get(le, 0.0))) for le, v in self._buckets[-1].items()]
        out: dict[str, float | None] = {}
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            v = quantile(delta, q)
            out[name] = None if v is None else round(v * 1000, 2)
        return out

    def _upstreams(self, fam: dict[str, Any], rates: dict[Any, float]) -> list[dict[str, Any]]:
        active = _by(fam.get("appliance_balancer_upstream_active"), "", "group", "upstream")
        healthy = _by(fam.get("appliance_balancer_upstream_healthy"), "", "group", "upstream", "state")
        states: dict[tuple[str, str], str] = {}
        for (group, upstream, state), v in healthy.items():
            if v >= 1:  # one state of each upstream is set to 1, the others to 0
                states[(group, upstream)] = state
        keys = sorted(set(states) | {k[1:] for k in rates if k[0] == "up"})
        return [
            {
                "group": g,
                "upstream": u,
                "state": states.get((g, u), "unknown"),
                "in_flight": active.get((g, u), 0.0),
                "requests_per_s": round(rates.get(("up", g, u), 0.0), 2),
                "failures_per_s": round(rates.get(("upfail", g, u), 0.0), 2),
            }
            for g, u in keys
        ]
