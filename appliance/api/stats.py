"""GET /api/metrics (admin): request statistics of every API worker, users, system health.

The numbers come from the one metrics mechanism (appliance.metrics: prometheus
multiprocess files in the data dir), so the answer covers all workers, not only
the one answering; `aggregate()` is the pure part (metric families in, numbers
out). Active users come from users.last_activity (written at most once a
minute per user by the identity middleware).
"""

from __future__ import annotations

import collections
import datetime as _dt
import os
import threading
import time
from typing import Any

import falcon
import msgspec

from appliance import metrics
from appliance.api import instruments
from appliance.api.context import ApiContext
from appliance.api.health import SystemInfo, system_info
from appliance.api.operations import ok, operation
from appliance.db.models import AuditEvent, User
from appliance.times import utcnow


class ApiMetrics(msgspec.Struct, kw_only=True):
    total_requests: int
    requests_per_minute: float
    avg_response_time: float  # milliseconds
    error_rate: float  # percent of responses with status >= 500
    client_error_rate: float  # percent of responses with status 400-499
    active_users: int
    concurrent_connections: int


class EndpointStat(msgspec.Struct, kw_only=True):
    method: str
    route: str
    requests: int
    errors: int
    error_rate: float
    avg_response_time: float
    statuses: dict[str, int]


class UserActivity(msgspec.Struct, kw_only=True):
    total_users: int
    active_users: int
    active_users_24h: int
    logins_24h: int
    failed_logins_24h: int
    new_users_24h: int


class MetricsOut(msgspec.Struct, kw_only=True):
    api_metrics: ApiMetrics
    endpoint_statistics: list[EndpointStat]
    user_activity: UserActivity
    system_health: SystemInfo
    workers: int
    timestamp: str


def families() -> list[Any]:
    """Every metric family: all processes' files in a worker, this process's registry otherwise."""
    if os.environ.get(metrics.ENV):
        return metrics.collect()
    from prometheus_client import REGISTRY

    return list(REGISTRY.collect())


def aggregate(fams: list[Any]) -> dict[str, Any]:
    """Totals and per-endpoint numbers from the API's metric families."""
    per: dict[tuple[str, str], dict[str, Any]] = collections.defaultdict(
        lambda: {"count": 0, "errors": 0, "statuses": {}, "sum": 0.0, "n": 0}
    )
    inflight = 0.0
    pids: set[str] = set()
    req_name, lat_name = instruments.REQUESTS, instruments.LATENCY
    for fam in fams:
        for s in fam.samples:
            if "pid" in s.labels:
                pids.add(s.labels["pid"])
            if s.name == req_name:
                e = per[(s.labels["method"], s.labels["route"])]
                e["count"] += int(s.value)
                e["statuses"][s.labels["status"]] = e["statuses"].get(s.labels["status"], 0) + int(s.value)
                if s.labels["status"].startswith("5"):
                    e["errors"] += int(s.value)
            elif s.name == lat_name + "_sum":
                per[(s.labels["method"], s.labels["route"])]["sum"] += s.value
            elif s.name == lat_name + "_count":
                per[(s.labels["method"], s.labels["route"])]["n"] += int(s.value)
            elif s.name == instruments.INFLIGHT:
                inflight += s.value
    total = sum(e["count"] for e in per.values())
    errors = sum(e["errors"] for e in per.values())
    client = sum(n for e in per.values() for code, n in e["statuses"].items() if code.startswith("4"))
    lat_sum = sum(e["sum"] for e in per.values())
    lat_n = sum(e["n"] for e in per.values())
    endpoints = [
        EndpointStat(
            method=method,
            route=route,
            requests=e["count"],
            errors=e["errors"],
            error_rate=round(100.0 * e["errors"] / e["count"], 2) if e["count"] else 0.0,
            avg_response_time=round(1000.0 * e["sum"] / e["n"], 2) if e["n"] else 0.0,
            statuses=dict(sorted(e["statuses"].items())),
        )
        for (method, route), e in per.items()
        if e["count"]
    ]
    endpoints.sort(key=lambda x: (-x.requests, x.route, x.method))
    return {
        "total_requests": total,
        "errors": errors,
        "error_rate": round(100.0 * errors / total, 2) if total else 0.0,
        "client_error_rate": round(100.0 * client / total, 2) if total else 0.0,
        "avg_response_time": round(1000.0 * lat_sum / lat_n, 2) if lat_n else 0.0,
        "concurrent_connections": max(0, int(inflight)),
        "endpoints": endpoints,
        "processes": len(pids),
    }


class RateWindow:
    """Requests per minute from (time, total) samples kept by this worker; time is a parameter."""

    def __init__(self, horizon: float = 300.0):
        self.horizon = horizon
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.lock = threading.Lock()

    def rate(self, now: float, total: int, since: float) -> float:
        with self.lock:
            self.samples.append((now, total))
            while len(self.samples) > 2 and now - self.samples[1][0] >= 60.0 and now - self.samples[0][0] > self.horizon:
                self.samples.popleft()
            t0, n0 = self.samples[0]
        if now - t0 >= 10.0:
            return round((total - n0) * 60.0 / (now - t0), 2)
        elapsed = max(now - since, 1.0)  # no history yet: the average since this worker started
        return round(total * 60.0 / elapsed, 2)


class MetricsResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self.window = RateWindow()

    @operation(
        "Request statistics of every API worker, user activity, system health (admin)", response=MetricsOut, auth="admin", tags=("api",)
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        agg = aggregate(families())
        now = utcnow()
        active = User.select().where(User.last_activity >= now - _dt.timedelta(minutes=15)).count()
        day = now - _dt.timedelta(days=1)
        activity = UserActivity(
            total_users=User.select().count(),
            active_users=active,
            active_users_24h=User.select().where(User.last_activity >= day).count(),
            logins_24h=AuditEvent.select().where((AuditEvent.event == "login_success") & (AuditEvent.at >= day)).count(),
            failed_logins_24h=AuditEvent.select().where((AuditEvent.event == "login_failed") & (AuditEvent.at >= day)).count(),
            new_users_24h=User.select().where(User.created_at >= day).count(),
        )
        api = ApiMetrics(
            total_requests=agg["total_requests"],
            requests_per_minute=self.window.rate(time.time(), agg["total_requests"], self.ctx.started),
            avg_response_time=agg["avg_response_time"],
            error_rate=agg["error_rate"],
            client_error_rate=agg["client_error_rate"],
            active_users=active,
            concurrent_connections=agg["concurrent_connections"],
        )
        ok(
            resp,
            MetricsOut(
                api_metrics=api,
                endpoint_statistics=agg["endpoints"],
                user_activity=activity,
                system_health=system_info(self.ctx),
                workers=self.ctx.cfg.api_workers,
                timestamp=now.isoformat(timespec="milliseconds") + "Z",
            ),
        )


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/api/metrics", MetricsResource(ctx))
