"""Least-connection picking with weights over one upstream group; ties go round-robin.

An upstream's load is its in-flight requests divided by its weight; the
lightest healthy upstream wins. Among equally loaded ones the one that has been
handed the fewest requests (again per weight) wins, and after that the
rotation order, so sequential requests on an idle group spread evenly and a
weight-2 upstream gets twice the share of a weight-1 one.

`Upstream` also carries what the proxy counts per upstream (active, requests,
failures) and its idle keep-alive connections (used by pool.py); the picker
itself does no I/O.
"""

from __future__ import annotations

import collections
from collections.abc import Container
from typing import Any

from appliance.balancer.upstream_state import DRAINING, HEALTHY, Health


class Upstream:
    """One upstream server of a group."""

    __slots__ = (
        "address",
        "host",
        "port",
        "group",
        "weight",
        "inv_weight",
        "health",
        "active",
        "served",
        "requests",
        "failures",
        "idle",
        "removed",
        "host_header",
        "flushed_requests",
        "flushed_failures",
    )

    def __init__(self, address: str, weight: int = 1, group: str = "api", health: Health | None = None):
        host, _, port = address.rpartition(":")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.host_header = address.encode("ascii")
        self.group = group
        self.weight = weight
        self.inv_weight = 1.0 / weight
        self.health = health or Health()
        self.active = 0  # requests in flight
        self.served = 0  # requests handed out by the picker (tie-break)
        self.requests = 0  # answered requests
        self.failures = 0  # failed requests (refused, dropped, timed out)
        self.idle: list = []  # idle keep-alive connections (pool.py)
        self.removed = False
        # requests/failures already moved into the shared metrics (stats.py); kept on the object, not
        # by address, so an upstream removed and re-added at the same address starts again from 0.
        self.flushed_requests = 0
        self.flushed_failures = 0

    def set_weight(self, weight: int) -> None:
        self.weight = weight
        self.inv_weight = 1.0 / weight

    @property
    def state(self) -> str:
        return self.health.state

    def __repr__(self) -> str:
        return f"Upstream({self.address}, {self.state}, active={self.active})"


class Group:
    """The upstreams one route sends to."""

    def __init__(self, name: str, upstreams: list[Upstream] | None = None):
        self.name = name
        self.upstreams: list[Upstream] = list(upstreams or [])
        # Requests waiting for a slot while every upstream has its most requests in flight (exchange.py), oldest first.
        self.waiting: collections.deque[Any] = collections.deque()
        self.waking = False
        self._next = 0
        self._orders: list[list[Upstream]] = []  # upstreams in rotation order from each start
        self._orders_of: list[Upstream] | None = None

    def add(self, upstream: Upstream) -> None:
        # A newcomer starts level with the others, or the tie-break would hand it every request for a while.
        live = [u.served * u.inv_weight for u in self.upstreams]
        upstream.served = int(min(live) * upstream.weight) if live else 0
        self.upstreams.append(upstream)
        self._orders_of = None

    def remove(self, upstream: Upstream) -> None:
        upstream.removed = True
        if upstream in self.upstreams:
            self.upstreams.remove(upstream)
            self._orders_of = None

    def find(self, address: str) -> Upstream | None:
        for u in self.upstreams:
            if u.address == address:
                return u
        return None

    def pick(self, exclude: Container[Upstream] = ()) -> Upstream | None:
        """The healthy upstream to send the next request to, or None when none is up."""
        ups = self.upstreams
        n = len(ups)
        start = self._next
        if start >= n:  # the group shrank
            start = 0
        best = None
        best_load = best_served = 0.0
        best_i = 0
        i = start
        if self._orders_of is not ups or len(self._orders) != n:  # the rotations, made once per membership
            self._orders = [ups[k:] + ups[:k] for k in range(n)]
            self._orders_of = ups
        for u in self._orders[start] if start else ups:  # rotation order from `start`
            if u.health.state == HEALTHY and not (exclude and u in exclude):
                inv = u.inv_weight
                load = u.active * inv
                if best is None or load < best_load or (load == best_load and u.served * inv < best_served):
                    best, best_load, best_served, best_i = u, load, u.served * inv, i
            i += 1
        if best is not None:
            best.served += 1
            best_i += 1
            self._next = best_i - n if best_i >= n else best_i
        return best

    def has_room(self, most_active: int) -> bool:
        """Whether a healthy upstream has fewer than `most_active` (per weight) requests in flight."""
        return any(u.health.state == HEALTHY and u.active * u.inv_weight < most_active for u in self.upstreams)

    def any_up(self) -> bool:
        return any(u.health.up for u in self.upstreams)

    def idle_drained(self) -> list[Upstream]:
        """Draining upstreams with nothing in flight."""
        return [u for u in self.upstreams if u.state == DRAINING and u.active == 0]
