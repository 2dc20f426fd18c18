"""Public health endpoints: /health/ping, /health/status, /health/nodes.

/health/ping never touches the database (the balancer's active check calls it
every few seconds). /health/status times a `SELECT 1`, the queue's depth (the
queue is opened at start, not by the first check) and a Redis PING; the
database failing makes the answer "unhealthy" with 503, the others "degraded". Every check opens what it needs per call, so the status
recovers by itself as soon as the database is back. /health/nodes reads the
heartbeats the supervisor's children write (appliance.db.models.NodeHeartbeat).
Both read what the monitor sampled last on this host when it is fresh
(appliance/hostsample.py: the status page's numbers, and restarts/PSS per process).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from typing import Any, Literal

import falcon
import msgspec
import psutil

from appliance import __version__, hostsample
from appliance.api.context import ApiContext
from appliance.api.operations import ok, operation, raw_json
from appliance.db.models import NodeHeartbeat
from appliance.errors import ServiceUnavailable
from appliance.heartbeat import host_name
from appliance.times import from_timestamp, iso, now_iso, utcnow

CheckStatus = Literal["healthy", "degraded", "unhealthy", "skipped"]


class PingData(msgspec.Struct, kw_only=True):
    node_id: str
    timestamp: str
    pid: int
    version: str


class Ping(msgspec.Struct, kw_only=True):
    status: Literal["ok"]
    node_id: str
    timestamp: str
    data: PingData


class Check(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: CheckStatus
    response_time: float | None = None
    error: str | None = None
    details: dict[str, Any] | None = None


class SystemInfo(msgspec.Struct, kw_only=True):
    uptime: float
    process_uptime: float
    cpu: dict[str, Any]
    memory: dict[str, Any]
    disk: dict[str, Any]
    load_average: list[float]
    sampled_at: str | None = None  # when the monitor measured cpu/memory/disk/load; null: this worker did


class StatusData(msgspec.Struct, kw_only=True):
    status: Literal["healthy", "degraded", "unhealthy"]
    node_id: str
    version: str
    timestamp: str
    checks: dict[str, Check]
    system: SystemInfo


class Status(msgspec.Struct, kw_only=True):
    status: Literal["healthy", "degraded", "unhealthy"]
    node_id: str
    version: str
    timestamp: str
    checks: dict[str, Check]
    system: SystemInfo
    data: StatusData


class Node(msgspec.Struct, kw_only=True):
    node_id: str
    role: str
    host: str
    pid: int
    status: str
    last_heartbeat: str | None
    started_at: str | None
    cpu: float
    memory: int
    stale: bool
    info: dict[str, Any]


class Nodes(msgspec.Struct, kw_only=True):
    nodes: list[Node]
    total_nodes: int
    active_nodes: int


def _sampled_system(ctx: ApiContext) -> SystemInfo | None:
    """The host numbers the monitor sampled last (what the status page shows), when they are fresh."""
    sample = hostsample.read(ctx.cfg, max_age=3 * ctx.cfg.monitor.sample_interval + 2)
    host = (sample or {}).get("host") or {}
    if not host.get("memory") or "cpu" not in host:
        return None
    disk = host.get("disk") or {}
    return SystemInfo(
        uptime=round(time.time() - psutil.boot_time(), 1),
        process_uptime=round(time.time() - ctx.started, 1),
        cpu={"percent": host["cpu"], "count": host.get("cpus") or psutil.cpu_count() or 1},
        memory={k: host["memory"].get(k) for k in ("total", "available", "percent")},
        disk={k: disk[k] for k in ("total", "free", "used", "percent") if k in disk},
        load_average=list(host.get("load") or []),
        sampled_at=iso(from_timestamp(float(sample["t"]))),  # type: ignore[index]
    )


def system_info(ctx: ApiContext) -> SystemInfo:
    sampled = _sampled_system(ctx)
    if sampled is not None:
        return sampled
    vm = psutil.virtual_memory()
    try:
        du = psutil.disk_usage(str(ctx.cfg.data_dir))
        disk = {"total": du.total, "free": du.free, "used": du.used, "percent": du.percent}
    except OSError:
        disk = {}
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - Linux always has it
        load = []
    return SystemInfo(
        uptime=round(time.time() - psutil.boot_time(), 1),
        process_uptime=round(time.time() - ctx.started, 1),
        cpu={"percent": psutil.cpu_percent(interval=None), "count": psutil.cpu_count() or 1},
        memory={"total": vm.total, "available": vm.available, "percent": vm.percent},
        disk=disk,
        load_average=load,
    )


def _timed(fn: Any) -> Check:
    started = time.perf_counter()
    try:
        details = fn()
    except Exception as exc:
        ms = round((time.perf_counter() - started) * 1000, 2)
        return Check(status="unhealthy", response_time=ms, error=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
    ms = round((time.perf_counter() - started) * 1000, 2)
    return Check(status="healthy", response_time=ms, details=details or None)


class HealthChecks:
    """The checks of /health/status; one Redis client per worker, made on first use."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self._redis: Any = None
        self._lock = threading.Lock()

    def database(self) -> Check:
        def probe() -> dict[str, Any]:
            self.ctx.db.execute_sql("SELECT 1").fetchone()  # type: ignore[union-attr]
            return {"engine": "postgresql" if self.ctx.cfg.database.url else "sqlite"}

        return _timed(probe)

    def queue(self) -> Check:
        from appliance.tasks import broker

        return _timed(lambda: broker.depth(self.ctx.cfg))

    def redis(self) -> Check:
        if not self.ctx.cfg.redis.url:
            return Check(status="skipped")
        with self._lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.ctx.cfg.redis.url, socket_timeout=2, socket_connect_timeout=2)
        return _timed(lambda: {"ping": bool(self._redis.ping())})

    def run(self) -> tuple[str, dict[str, Check]]:
        checks = {"database": self.database(), "queue": self.queue()}
        if self.ctx.cfg.redis.url:
            checks["redis"] = self.redis()
        if checks["database"].status == "unhealthy":
            overall = "unhealthy"
        elif any(c.status == "unhealthy" for c in checks.values()):
            overall = "degraded"
            for c in checks.values():
                if c.status == "unhealthy":
                    c.status = "degraded" if c is not checks["database"] else c.status
        else:
            overall = "healthy"
        return overall, checks


class PingResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Liveness of the answering API worker (503 when its threads are stuck)",
        response=Ping,
        envelope=False,
        tags=("health",),
        also=(503,),
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.ctx.pool_stalled():
            raise ServiceUnavailable("every thread of this worker is busy and none has finished a request lately", code="worker_stalled")
        stamp = now_iso()
        data = PingData(node_id=self.ctx.node_id, timestamp=stamp, pid=os.getpid(), version=__version__)
        raw_json(resp, Ping(status="ok", node_id=self.ctx.node_id, timestamp=stamp, data=data))


class StatusResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self.checks = HealthChecks(ctx)
        # The first queue check of a process imports huey (and redis with it) and opens the queue: ~150 ms on
        # SQLite, paid by the first /health/status of every worker. Done when the worker starts, off any request,
        # it costs a request what the check itself costs (a COUNT, well under a millisecond).
        ctx.warmups.append(self.checks.queue)

    @operation(
        "Health of this node: database, queue, Redis and system",
        response=Status,
        envelope=False,
        tags=("health",),
        also=(503,),
        description="503 (same body) when the database is unreachable.",
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        overall, checks = self.checks.run()
        data = StatusData(
            status=overall,  # type: ignore[arg-type]
            node_id=self.ctx.node_id,
            version=__version__,
            timestamp=now_iso(),
            checks=checks,
            system=system_info(self.ctx),
        )
        body = Status(**{f: getattr(data, f) for f in data.__struct_fields__}, data=data)
        raw_json(resp, body, status=503 if overall == "unhealthy" else 200)


class NodesResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Every process of every host, from their heartbeats", response=Nodes, tags=("health",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        cutoff = utcnow() - _dt.timedelta(seconds=self.ctx.cfg.supervisor.heartbeat_timeout)
        # This host's processes as the monitor sampled them: restarts, state and PSS join the heartbeat's info.
        sample = hostsample.read(self.ctx.cfg, max_age=3 * self.ctx.cfg.monitor.sample_interval + 2) or {}
        sampled = {r.get("pid"): r for r in sample.get("processes", []) if r.get("pid")}
        here = host_name(self.ctx.cfg)
        nodes = []
        for row in NodeHeartbeat.select().order_by(NodeHeartbeat.host, NodeHeartbeat.role, NodeHeartbeat.node_id):
            stale = row.last_heartbeat is None or row.last_heartbeat < cutoff
            nodes.append(
                Node(
                    node_id=row.node_id,
                    role=row.role,
                    host=row.host,
                    pid=row.pid,
                    status="stale" if stale and row.status not in ("stopped", "exited") else row.status,
                    last_heartbeat=iso(row.last_heartbeat),
                    started_at=iso(row.started_at),
                    cpu=float(row.cpu or 0.0),
                    memory=int(row.rss or 0),
                    stale=stale,
                    info=_with_sample(row, sampled if row.host == here else {}),
                )
            )
        active = sum(1 for n in nodes if not n.stale and n.status not in ("stopped", "exited", "failed"))
        ok(resp, Nodes(nodes=nodes, total_nodes=len(nodes), active_nodes=active))


def _with_sample(row: NodeHeartbeat, sampled: dict[int, dict[str, Any]]) -> dict[str, Any]:
    info = dict(row.info) if isinstance(row.info, dict) else {}
    r = sampled.get(row.pid)
    if r is not None:
        info.update({k: r.get(k) for k in ("state", "restarts", "pss", "threads", "open_files")})
    return info


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/health/ping", PingResource(ctx))
    app.add_route("/health/status", StatusResource(ctx))
    app.add_route("/health/nodes", NodesResource(ctx))
