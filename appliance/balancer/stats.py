"""What the balancer counts, and the access log, at a few integer additions per request.

The request path only adds to plain ints and dicts here (and to the counters
on each Upstream); `flush()`, run once a second off the request path, moves the
deltas into prometheus_client's multiprocess files (appliance.metrics), where
the monitor and /metrics read them. Latency is kept per upstream group as
counts per histogram bucket and pushed into the Histogram's buckets directly.

The access log is one line per request in the process's log format (the one
setup_logging installed, which `--log-format` may have set over [logging]
format): a JSON object shaped like appliance.logs' lines (logger
"appliance.balancer.access") or a text line for people. Lines are buffered and
written to stdout a few times a second; `access_log = false` turns it off.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

log = logging.getLogger(__name__)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LOGGER = "appliance.balancer.access"
_STATES = ("healthy", "unhealthy", "ejected", "draining")


class GroupLatency:
    """Counts per latency bucket (the last slot is +Inf) and their sum, since the last flush."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class Stats:
    """Counters of one balancer process since its last flush."""

    def __init__(self, registry: Any = None) -> None:
        """`registry`: the prometheus CollectorRegistry to record into (tests); the default one otherwise."""
        self.status: dict[int, int] = {}
        self.latency: dict[str, GroupLatency] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.rate_limited: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.connections = 0  # open client connections (a gauge, not a delta)
        self._metrics: Any = None
        self._registry = registry

    def latency_of(self, group: str) -> GroupLatency:
        lat = self.latency.get(group)
        if lat is None:
            lat = self.latency[group] = GroupLatency()
        return lat

    # -- flushing into prometheus (off the request path) --------------------------------
    def _prometheus(self) -> Any:
        if self._metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            reg = {} if self._registry is None else {"registry": self._registry}
            self._metrics = {
                "requests": Counter("appliance_balancer_requests", "answers sent by the balancer", ["status"], **reg),
                "bytes": Counter("appliance_balancer_bytes", "body bytes through the balancer", ["direction"], **reg),
                "rate_limited": Counter("appliance_balancer_rate_limited", "requests refused by a rate-limit zone", ["zone"], **reg),
                "auth_failures": Counter("appliance_balancer_auth_failures", "requests refused by the token hook", ["code"], **reg),
                "up_requests": Counter(
                    "appliance_balancer_upstream_requests", "requests answered per upstream", ["group", "upstream"], **reg
                ),
                "up_failures": Counter(
                    "appliance_balancer_upstream_failures", "failed requests per upstream", ["group", "upstream"], **reg
                ),
                "up_active": Gauge(
                    "appliance_balancer_upstream_active",
                    "requests in flight per upstream",
                    ["group", "upstream"],
                    multiprocess_mode="livesum",
                    **reg,
                ),
                "up_healthy": Gauge(
                    "appliance_balancer_upstream_healthy",
                    "1 when the upstream gets traffic (healthy), else 0",
                    ["group", "upstream", "state"],
                    multiprocess_mode="livemax",
                    **reg,
                ),
                "connections": Gauge("appliance_balancer_connections", "open client connections", multiprocess_mode="livesum", **reg),
                "latency": Histogram(
                    "appliance_balancer_upstream_latency_seconds", "time to a whole answer per group", ["group"], buckets=BUCKETS, **reg
                ),
            }
        return self._metrics

    def flush(self, groups: dict[str, Any], retired: Iterable[Any] = ()) -> None:
        """Move the counts since the last flush into the shared metrics files.

        `groups` are the live upstream groups; `retired` the upstreams removed since the last flush.
        """
        try:
            m = self._prometheus()
        except Exception as exc:  # metrics must never take the proxy down
            log.warning("metrics are not recorded: %s", exc)
            self._metrics = False
            return
        if m is False:
            return
        status, self.status = self.status, {}
        for code, n in status.items():
            m["requests"].labels(str(code)).inc(n)
        if self.bytes_in or self.bytes_out:
            m["bytes"].labels("in").inc(self.bytes_in)
            m["bytes"].labels("out").inc(self.bytes_out)
            self.bytes_in = self.bytes_out = 0
        for name, src in (("rate_limited", "rate_limited"), ("auth_failures", "auth_failures")):
            values = getattr(self, src)
            if values:
                setattr(self, src, {})
                for label, n in values.items():
                    m[name].labels(label).inc(n)
        latency, self.latency = self.latency, {}
        for group, lat in latency.items():
            child = m["latency"].labels(group)
            # prometheus_client keeps non-cumulative bucket values; add our counts to each.
            for i, n in enumerate(lat.counts):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(lat.total)
        m["connections"].set(self.connections)
        self._flush_upstreams(m, groups, retired)

    def _flush_upstreams(self, m: dict[str, Any], groups: dict[str, Any], retired: Iterable[Any]) -> None:
        for u in retired:
            # Its last counts, then its gauges to zero: a removed upstream is neither busy nor up.
            self._flush_counts(m, u)
            m["up_active"].labels(u.group, u.address).set(0)
            for state in _STATES:
                m["up_healthy"].labels(u.group, u.address, state).set(0)
        for gname, group in groups.items():
            for u in group.upstreams:
                self._flush_counts(m, u, gname)
                m["up_active"].labels(gname, u.address).set(u.active)
                for state in _STATES:
                    m["up_healthy"].labels(gname, u.address, state).set(1 if u.state == state else 0)

    @staticmethod
    def _flush_counts(m: dict[str, Any], u: Any, gname: str | None = None) -> None:
        """Move an upstream's requests and failures since its last flush (never negative: they only grow)."""
        gname = gname or u.group
        if u.requests > u.flushed_requests:
            m["up_requests"].labels(gname, u.address).inc(u.requests - u.flushed_requests)
        if u.failures > u.flushed_failures:
            m["up_failures"].labels(gname, u.address).inc(u.failures - u.flushed_failures)
        u.flushed_requests = u.requests
        u.flushed_failures = u.failures


def process_log_format(default: str = "json") -> str:
    """The format this process logs in: what setup_logging installed on the root logger.

    `appliance _child balancer --log-format text` (how the supervisor starts it) overrides
    [logging] format, so the handler, not the config, is the truth; `default` when no
    appliance handler is installed (a balancer built in a test).
    """
    from appliance.logs import JsonFormatter, TextFormatter

    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, TextFormatter):
            return "text"
        if isinstance(handler.formatter, JsonFormatter):
            return "json"
    return default


class AccessLog:
    """Buffered access-log lines; `line()` per answer, `flush()` a few times a second.

    `line()` only records the values (a tuple and the time); they are formatted in
    `flush()`, many at once, so the request path does no formatting at all.
    JSON: the shape of appliance.logs' JsonFormatter lines (logger appliance.balancer.access).
    Text: the shape of its TextFormatter lines, for people:
      20:15:40 INFO    balancer[123] GET /api/x 200 1.2ms client=127.0.0.1 upstream=127.0.0.1:8101 in=0 out=57 user=7 (request ab12)
    Time stamps are formatted once per second, not per line.
    """

    FLUSH_AT = 512  # records buffered before a flush from the request path

    def __init__(self, enabled: bool, fmt: str = "json", fd: int = 1):
        self.enabled = enabled
        self.text = fmt == "text"
        self.fd = fd
        self.pid = os.getpid()
        self._records: list[tuple[Any, ...]] = []
        self._sec = -1
        self._prefix = ""
        self._text_sec = -1
        self._text_prefix = ""

    def _stamp(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1000):03d}Z"

    def _text_stamp(self, now: float) -> str:
        sec = int(now)
        if sec != self._text_sec:
            self._text_sec = sec
            self._text_prefix = time.strftime("%H:%M:%S", time.localtime(sec)) + f" INFO    balancer[{self.pid}] "
        return self._text_prefix

    def line(
        self,
        request_id: str | bytes,
        client: str,
        method: str | bytes,
        path: str,
        status: int,
        upstream: str | None,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        user_id: str | None,
    ) -> None:
        """Record one answer (request id and method may be the raw bytes); formatted at flush."""
        records = self._records
        records.append((time.time(), request_id, client, method, path, status, upstream, bytes_in, bytes_out, duration, user_id))
        if len(records) >= self.FLUSH_AT:
            self.flush()

    def _format(self, records: list[tuple[Any, ...]]) -> bytes:
        lines = []
        if self.text:
            stamp = self._text_stamp
            for now, rid, client, method, path, status, upstream, bytes_in, bytes_out, duration, user_id in _decoded(records):
                lines.append(
                    f"{stamp(now)}{method} {path} {status} {duration * 1000:.1f}ms client={client} "
                    f"upstream={upstream or '-'} in={bytes_in} out={bytes_out} user={user_id or '-'} (request {rid})\n"
                )
            return "".join(lines).encode("utf-8", "replace")
        dumps, pid, stamp = orjson.dumps, self.pid, self._stamp
        for now, rid, client, method, path, status, upstream, bytes_in, bytes_out, duration, user_id in _decoded(records):
            lines.append(
                dumps(
                    {
                        "time": stamp(now),
                        "level": "info",
                        "role": "balancer",
                        "pid": pid,
                        "logger": _LOGGER,
                        "message": "request",
                        "request_id": rid,
                        "client": client,
                        "method": method,
                        "path": path,
                        "status": status,
                        "upstream": upstream,
                        "bytes_in": bytes_in,
                        "bytes_out": bytes_out,
                        "duration_ms": round(duration * 1000, 3),
                        "user_id": user_id,
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
        return b"".join(lines)

    def flush(self) -> None:
        if not self._records:
            return
        records, self._records = self._records, []
        data = self._format(records)
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # the reader is behind; dropping log lines beats stalling the proxy
        except OSError as exc:
            self.enabled = False
            log.warning("access log turned off: stdout cannot be written (%s)", exc)


def _decoded(records: list[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Access records with the request id and method as text (the proxy hands bytes over as they came)."""
    for now, rid, client, method, *rest in records:
        if rid.__class__ is bytes:
            rid = rid.decode("latin-1")
        if method.__class__ is bytes:
            method = method.decode("latin-1")
        yield (now, rid, client, method, *rest)
