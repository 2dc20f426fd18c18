"""The monitor's sampling loop: every [monitor] sample_interval, one sample of everything.

A sample is one JSON-able dict (processes, host, api, tasks, database, redis,
security, overview, alerts; each alert change also goes to the alert webhook of
appliance/monitor/webhook.py when one is set). The latest is kept whole
(`latest()`, what the page's tables show); a compact point of the numbers the charts draw goes into
the hour-long ring buffer (`history`). The status page, /health/status and
/health/nodes read the host part through appliance/hostsample.py. `sample_once(now)`
is the whole step, so tests can drive it with their own clock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from appliance import hostsample
from appliance.heartbeat import host_name
from appliance.monitor import instruments, stores
from appliance.monitor.alerts import Alerts
from appliance.monitor.collectors import HostCollector, ProcessCollector, TrafficCollector
from appliance.monitor.history import History
from appliance.monitor.webhook import AlertWebhook

log = logging.getLogger(__name__)

HISTORY_SECONDS = 3600.0
RECENT_RESTART = 120.0  # seconds a restarted process stays marked (amber) on the page


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # one failing source must not stop the others
        log.debug("sampling %s failed", getattr(fn, "__qualname__", fn), exc_info=True)
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _level(ok: bool, warn: bool = False) -> str:
    return "green" if ok and not warn else ("amber" if ok else "red")


def overview(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """One green/amber/red line per role and for the database, Redis and the disk, with the reason when not green."""
    lines: list[dict[str, Any]] = []
    rows = sample.get("processes", {}).get("rows", [])
    roles: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        roles.setdefault(r["role"], []).append(r)
    for role, members in roles.items():
        down = [f"{role}[{m['index']}] {m['state']}" for m in members if m.get("state") not in ("up", "draining")]
        recent = [
            f"{role}[{m['index']}] restarted {int(m['uptime'])} s ago"
            for m in members
            if (m.get("restarts") or 0) > 0 and m.get("uptime") is not None and m["uptime"] < RECENT_RESTART
        ]
        level = "red" if down and len(down) == len(members) else ("amber" if down or recent else "green")
        restarts = sum(m.get("restarts") or 0 for m in members)
        reason = "; ".join(down + recent)
        detail = f"{len(members)} process(es), {restarts} restart(s)"
        jobs = sorted({j for m in members for j in m.get("jobs") or ()})
        if jobs:  # the monitor's line stands for the scheduler too
            detail += f", also runs the {', '.join(jobs)}"
        lines.append({"name": role, "level": level, "reason": reason, "detail": detail})
    if "error" in sample.get("processes", {}):
        lines.append({"name": "supervisor", "level": "red", "reason": sample["processes"]["error"], "detail": ""})
    db = sample.get("database", {})
    lines.append(
        {
            "name": "database",
            "level": "green" if db.get("reachable") else "red",
            "reason": db.get("error", ""),
            "detail": db.get("engine", ""),
        }
    )
    redis = sample.get("redis")
    if redis is not None:
        lines.append(
            {"name": "redis", "level": "green" if redis.get("reachable") else "red", "reason": redis.get("error", ""), "detail": ""}
        )
    hosts = sample.get("cluster", {}).get("hosts", [])
    if len(hosts) > 1:  # one line for the cluster once a second host has beaten
        down = [h["host"] for h in hosts if h["state"] == "down"]
        up = sum(1 for h in hosts if h["state"] == "up")
        level = "green" if not down else ("red" if up == 0 else "amber")
        reason = "down: " + ", ".join(down) if down else ""
        lines.append({"name": "hosts", "level": level, "reason": reason, "detail": f"{up} of {len(hosts)} up"})
    disk = sample.get("host", {}).get("disk", {})
    free = disk.get("free_percent")
    if free is None:
        lines.append({"name": "disk", "level": "red", "reason": disk.get("error", "unknown"), "detail": ""})
    else:
        level = "green" if free >= 20 else ("amber" if free >= 10 else "red")
        lines.append({"name": "disk", "level": level, "reason": "" if level == "green" else f"{free} % free", "detail": f"{free} % free"})
    return lines


def point(sample: dict[str, Any]) -> dict[str, Any]:
    """The numbers the charts draw, from one sample."""
    api, host, tasks, sec = sample.get("api", {}), sample.get("host", {}), sample.get("tasks", {}), sample.get("security", {})
    rows = sample.get("processes", {}).get("rows", [])
    lat = api.get("latency") or {}
    classes = api.get("classes_per_s") or {}
    return {
        "t": sample["t"],
        "rps": api.get("requests_per_s"),
        "p50": lat.get("p50"),
        "p95": lat.get("p95"),
        "p99": lat.get("p99"),
        "e4xx": classes.get("4xx"),
        "e5xx": classes.get("5xx"),
        "cpu": host.get("cpu"),
        "mem": (host.get("memory") or {}).get("percent"),
        "rss": sum(r.get("rss") or 0 for r in rows),
        "queued": tasks.get("queued"),
        "running": tasks.get("running"),
        "ok_min": tasks.get("succeeded_per_min"),
        "fail_min": tasks.get("failed_per_min"),
        "login_fail_min": sec.get("failed_logins_per_min"),
        "lockouts_min": sec.get("lockouts_per_min"),
        "limited": sum((api.get("rate_limited_per_s") or {}).values()),
        "locked": (sec.get("locked_accounts") or 0) + (sec.get("locked_addresses") or 0),
    }


class Sampler(threading.Thread):
    def __init__(self, cfg: Any, db: Any, run_dir: Any):
        super().__init__(name="sampler", daemon=True)
        self.cfg = cfg
        self.db = db
        self.interval = cfg.monitor.sample_interval
        self.processes = ProcessCollector(run_dir)
        self.host = HostCollector(cfg.data_dir)
        self.traffic = TrafficCollector(interval=self.interval)
        self.redis = stores.RedisProbe(cfg.redis.url)
        self.here = host_name(cfg)
        self.history = History(HISTORY_SECONDS, self.interval)
        self.alerts = Alerts(cfg.monitor.alerts, self._count_alert)
        self.webhook = AlertWebhook.from_config(cfg, instruments.webhook)
        self._latest: dict[str, Any] = {}
        self._stop = threading.Event()
        self.cost = 0.0  # cpu seconds this thread spent sampling, for the README's figure
        self.samples = 0

    def _count_alert(self, name: str, state: str) -> None:
        try:
            instruments.alert(name, state, len(self.alerts.firing))
        except Exception:  # metrics must not stop the alerts
            log.debug("alert metric failed", exc_info=True)

    def _stores(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            self.db.connect(reuse_if_open=True)
            out["database"] = _safe(stores.database_sample, self.db, self.cfg)
            if "error" in out["database"]:
                out["database"]["reachable"] = False
            else:
                out["tasks"] = _safe(stores.queue_sample, now)
                out["security"] = _safe(stores.security_sample, now)
                out["cluster"] = _safe(stores.hosts_sample, now, self.cfg.supervisor.heartbeat_timeout, self.here)
        except Exception as exc:
            out["database"] = {"reachable": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            if self.cfg.database.url:  # back to the pool; SQLite keeps its one connection
                self.db.close()
        out.setdefault("tasks", {"error": "the database is unreachable"})
        out.setdefault("security", {"error": "the database is unreachable"})
        out.setdefault("cluster", {"error": "the database is unreachable"})
        return out

    def sample_once(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        started = time.thread_time()
        sample: dict[str, Any] = {"t": round(now, 3)}
        sample["processes"] = _safe(self.processes.sample, now)
        sample["host"] = _safe(self.host.sample, now)
        sample["api"] = _safe(self.traffic.sample, now)
        sample.update(self._stores(now))
        sample["redis"] = self.redis.sample()
        sample["overview"] = overview(sample)
        for change in self.alerts.evaluate(sample, now):
            if self.webhook is not None:
                self.webhook.send(change)
        sample["alerts"] = self.alerts.view()
        self.history.add(point(sample))
        self._publish(sample)
        self.cost += time.thread_time() - started
        sample["sampler"] = {"cpu_seconds": round(self.cost, 3), "samples": self.samples, "interval": self.interval}
        self.samples += 1
        self._latest = sample
        return sample

    def _publish(self, sample: dict[str, Any]) -> None:
        """The host and process part of the sample for /health/status and /health/nodes (appliance/hostsample.py)."""
        keep = ("role", "index", "pid", "state", "restarts", "cpu", "rss", "pss", "threads", "open_files")
        rows = [{k: r.get(k) for k in keep} for r in sample.get("processes", {}).get("rows", [])]
        try:
            hostsample.write(self.cfg, {"t": sample["t"], "interval": self.interval, "host": sample.get("host", {}), "processes": rows})
        except OSError as exc:
            log.debug("host sample not published: %s", exc)

    def latest(self) -> dict[str, Any]:
        return self._latest

    def run(self) -> None:
        try:
            instruments.start()
        except Exception:  # metrics must not stop the sampling
            log.debug("alert metrics unavailable", exc_info=True)
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:  # never let the loop die; the page shows the last good sample's age
                log.exception("sampling failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
