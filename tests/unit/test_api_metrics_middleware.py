"""The API's request metrics: each label set's children are looked up once per worker, and still count every request."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.api import instruments
from tests.api_support import client_for


class CountingLabels:
    """The real metric, with its labels() calls counted (every child still counts for real)."""

    def __init__(self, metric: Any):
        self.metric, self.calls = metric, 0

    def labels(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.metric.labels(*args, **kw)


@pytest.fixture
def counted():
    inst = instruments.get()
    real = {k: inst[k] for k in ("requests", "latency")}
    inst["requests"], inst["latency"] = CountingLabels(real["requests"]), CountingLabels(real["latency"])
    try:
        yield inst, real
    finally:
        inst.update(real)


def test_children_are_found_once_per_label_set_and_count_every_request(make_config, counted):
    inst, real = counted
    client = client_for(make_config())
    child = real["requests"].labels("GET", "/health/ping", "200")
    before = child._value.get()
    for _ in range(5):
        assert client.simulate_get("/health/ping").status_code == 200
    client.simulate_get("/no/such/route")
    assert inst["requests"].calls == 2 and inst["latency"].calls == 2  # ping once, unmatched once
    assert child._value.get() == before + 5
    assert real["requests"].labels("GET", "unmatched", "404")._value.get() >= 1
