"""GET /metrics: every process's own metrics plus the conventional families, aggregated over the host.

The recorders (balancer, api workers, the monitor's alerts) write their own
families into the shared multiprocess files (appliance/metrics.py). On top of
those, this collector offers the names a Prometheus user expects, derived at
scrape time so nothing is counted twice:

  appliance_http_requests_total{route,method,code}     from the API workers' counter
  appliance_http_request_duration_seconds{route,method} histogram, same source
  appliance_upstream_up{group,upstream}, appliance_upstream_in_flight{group,upstream}
  appliance_rate_limited_total{zone}                    from the balancer
  appliance_tasks_total{type,status}                    finished tasks in the tasks table
  appliance_queue_depth{priority}                       queued tasks, priorities 1..10
  appliance_process_cpu_seconds_total{role,index}, appliance_process_resident_memory_bytes{role,index}
                                                        from the sampler's last sample

Label values stay bounded: routes are URI templates ("unmatched" for anything
unknown, set by the API), methods outside the standard ones become "other",
task types are the registered ones, priorities are 1..10.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
FINISHED = ("succeeded", "failed", "cancelled")


def _method(value: str) -> str:
    return value if value in METHODS else "other"


def _samples(families: dict[str, Any], name: str, suffix: str) -> Iterator[Any]:
    family = families.get(name)
    if family is not None:
        for s in family.samples:
            if s.name == name + suffix:
                yield s


class ConventionalCollector:
    """A prometheus_client collector (`collect()`) over the multiprocess families, the sampler and the tasks table."""

    def __init__(self, source: Any, sampler: Any = None, db: Any = None):
        self.source = source  # the multiprocess collector whose families are renamed
        self.sampler = sampler
        self.db = db

    def collect(self) -> Iterator[Any]:
        families = {f.name: f for f in self.source.collect()}
        yield from self._http(families)
        yield from self._balancer(families)
        yield from self._tasks()
        yield from self._processes()

    def _http(self, families: dict[str, Any]) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "appliance_http_requests", "HTTP requests answered by the API workers", labels=["route", "method", "code"]
        )
        totals: dict[tuple[str, str, str], float] = {}
        for s in _samples(families, "appliance_api_requests", "_total"):
            key = (s.labels.get("route", ""), _method(s.labels.get("method", "")), s.labels.get("status", ""))
            totals[key] = totals.get(key, 0.0) + s.value
        for key, v in sorted(totals.items()):
            requests.add_metric(list(key), v)
        yield requests

        duration = HistogramMetricFamily(
            "appliance_http_request_duration_seconds", "time the API workers took to answer", labels=["route", "method"]
        )
        buckets: dict[tuple[str, str], dict[str, float]] = {}
        sums: dict[tuple[str, str], float] = {}
        for s in _samples(families, "appliance_api_request_duration_seconds", "_bucket"):
            key = (s.labels.get("route", ""), _method(s.labels.get("method", "")))
            le = s.labels["le"]
            b = buckets.setdefault(key, {})
            b[le] = b.get(le, 0.0) + s.value
        for s in _samples(families, "appliance_api_request_duration_seconds", "_sum"):
            key = (s.labels.get("route", ""), _method(s.labels.get("method", "")))
            sums[key] = sums.get(key, 0.0) + s.value
        for key, b in sorted(buckets.items()):
            ordered = sorted(b.items(), key=lambda kv: float(kv[0]))
            duration.add_metric(list(key), ordered, sums.get(key, 0.0))
        yield duration

    def _balancer(self, families: dict[str, Any]) -> Iterator[Any]:
        up = GaugeMetricFamily("appliance_upstream_up", "1 when the upstream is healthy and gets traffic", labels=["group", "upstream"])
        for s in _samples(families, "appliance_balancer_upstream_healthy", ""):
            if s.labels.get("state") == "healthy":
                up.add_metric([s.labels.get("group", ""), s.labels.get("upstream", "")], s.value)
        yield up
        flight = GaugeMetricFamily("appliance_upstream_in_flight", "requests in flight per upstream", labels=["group", "upstream"])
        for s in _samples(families, "appliance_balancer_upstream_active", ""):
            flight.add_metric([s.labels.get("group", ""), s.labels.get("upstream", "")], s.value)
        yield flight
        limited = CounterMetricFamily("appliance_rate_limited", "requests refused by a rate-limit zone", labels=["zone"])
        for s in _samples(families, "appliance_balancer_rate_limited", "_total"):
            limited.add_metric([s.labels.get("zone", "")], s.value)
        yield limited

    def _tasks(self) -> Iterator[Any]:
        tasks = CounterMetricFamily(
            "appliance_tasks", "finished tasks by type and status (rows of the tasks table)", labels=["type", "status"]
        )
        depth = GaugeMetricFamily("appliance_queue_depth", "tasks waiting in the queue by priority (1 = most urgent)", labels=["priority"])
        if self.db is not None:
            import peewee as pw

            from appliance.db.models import Task

            try:
                with self.db.connection_context():
                    rows = (
                        Task.select(Task.task_type, Task.status, pw.fn.COUNT(Task.id))
                        .where(Task.status.in_(FINISHED))
                        .group_by(Task.task_type, Task.status)
                        .tuples()
                    )
                    for task_type, status, n in sorted(rows):
                        tasks.add_metric([task_type, status], float(n))
            except Exception:  # the database down: the families stay empty, /metrics still answers
                pass
        latest = self.sampler.latest() if self.sampler is not None else {}
        queued = (latest.get("tasks") or {}).get("queued_by_priority") or {}
        if latest.get("tasks") and "error" not in latest["tasks"]:
            for p in range(1, 11):
                depth.add_metric([str(p)], float(queued.get(str(p), 0)))
        yield tasks
        yield depth

    def _processes(self) -> Iterator[Any]:
        cpu = CounterMetricFamily("appliance_process_cpu_seconds", "cpu time of each process of the appliance", labels=["role", "index"])
        rss = GaugeMetricFamily("appliance_process_resident_memory_bytes", "resident memory of each process", labels=["role", "index"])
        latest = self.sampler.latest() if self.sampler is not None else {}
        for r in (latest.get("processes") or {}).get("rows", []):
            labels = [str(r.get("role")), str(r.get("index"))]
            if r.get("cpu_seconds") is not None:
                cpu.add_metric(labels, float(r["cpu_seconds"]))
            if r.get("rss") is not None:
                rss.add_metric(labels, float(r["rss"]))
        yield cpu
        yield rss
