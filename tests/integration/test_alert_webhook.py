"""The alert webhook: alert changes POSTed, signed, to a real receiver on loopback.

The evaluator runs with its own clock (firing and resolved without waiting out a
hold); the POSTs are real, to a real HTTP server on 127.0.0.1, which is internal,
so it is reached only when [queue] callback_allow lets it. The signature is
checked with the README's receiver code. One slow test runs a real appliance
whose monitor fires an alert at its first sample and POSTs it.
"""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance import addresses, outbound
from appliance.config import AlertSettings, load_config
from appliance.monitor.alerts import Alerts
from appliance.monitor.webhook import AlertWebhook
from tests.conftest import write_config
from tests.integration.supervised import Appliance, wait_until
from tests.integration.test_callbacks import Receiver, readme_verify

SECRET = "s" * 32
LOOPBACK = addresses.Policy.from_entries(["127.0.0.1/32"])
OFF = dict.fromkeys(("memory_percent", "disk_free_percent", "error_ratio", "p99_ms", "queue_age_seconds", "login_failures_per_min"), 0.0)


@pytest.fixture
def rx() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def _webhook(url: str, policy: addresses.Policy, results: list[str], **kw: Any) -> AlertWebhook:
    return AlertWebhook(url, SECRET, policy, "node-1", results.append, backoff=0.01, **kw)


def _fire_and_resolve(hook: AlertWebhook) -> None:
    """cpu above 50 % for the 10 s hold, then below it for 10 s: one firing, one resolved change, sent to `hook`."""
    alerts = Alerts(AlertSettings(cpu_percent=50, hold_seconds=10, process_failed=False, store_unreachable=False, **OFF))
    for now, cpu in ((0, 95), (5, 96), (10, 97), (20, 10), (25, 10), (30, 11)):
        for change in alerts.evaluate({"host": {"cpu": cpu}}, now):
            hook.send(change)


def test_firing_and_resolved_alerts_are_posted_signed(rx: Receiver) -> None:
    url = f"{rx.base}/alerts?k=1"
    results: list[str] = []
    hook = _webhook(url, LOOPBACK, results)
    _fire_and_resolve(hook)
    hook.close()
    assert [g["path"] for g in rx.got] == ["/alerts?k=1"] * 2 and results == ["sent", "sent"]
    verify = readme_verify()
    bodies = []
    for got in rx.got:
        assert got["method"] == "POST" and verify(SECRET, url, got["headers"], got["body"]), got
        assert not verify(SECRET, url + "x", got["headers"], got["body"]) and not verify("y" * 32, url, got["headers"], got["body"])
        assert got["headers"]["X-Appliance-Event"] == "alert" and got["headers"]["Content-Type"] == "application/json"
        bodies.append(orjson.loads(got["body"]))
    firing, resolved = bodies
    assert {k: firing[k] for k in ("alert", "state", "value", "threshold", "node")} == {
        "alert": "host_cpu",
        "state": "firing",
        "value": 97,
        "threshold": 50,
        "node": "node-1",
    }
    assert resolved["alert"] == "host_cpu" and resolved["state"] == "resolved" and resolved["value"] == 11
    assert resolved["since"] == 10 and firing["time"] and resolved["time"]


def test_a_receiver_address_not_allowed_is_refused_and_logged(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    results: list[str] = []
    hook = _webhook(f"{rx.base}/alerts", addresses.Policy(), results)  # nothing allowed: loopback is internal
    with caplog.at_level(logging.WARNING, logger="appliance"):
        _fire_and_resolve(hook)
        hook.close()
    assert rx.got == [] and results == ["failed", "failed"]
    problems = [r.fields["problem"] for r in caplog.records if r.getMessage() == "alert webhook not delivered"]
    assert len(problems) == 2 and all("127.0.0.1 is a loopback address" in p and "callback_allow" in p for p in problems), problems
    tries = [r for r in caplog.records if r.getMessage() == "alert webhook failed"]
    assert len(tries) == 2  # a refused address is not retried


def test_a_full_queue_drops_counts_and_logs_and_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    # A listener that never answers holds the one POST in flight; the queue holds one more; the rest are dropped.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        results: list[str] = []
        hook = _webhook(f"http://127.0.0.1:{silent.getsockname()[1]}/", LOOPBACK, results, queue_size=1)
        with caplog.at_level(logging.WARNING, logger="appliance"):
            for i in range(4):
                hook.send({"alert": f"a{i}", "state": "firing", "value": 1, "threshold": 0})
    assert results.count("dropped") >= 2 and hook.dropped == results.count("dropped")
    assert sum(r.getMessage() == "alert webhook queue full: alert dropped" for r in caplog.records) == hook.dropped


@pytest.mark.slow
def test_the_monitor_posts_a_real_alert_and_counts_it(tmp_path: Path, rx: Receiver) -> None:
    app = Appliance(tmp_path, api_workers=1, task_workers=0, monitor=True)
    # disk free < 99.99 % always holds: the alert fires at the first sample; every other alert off
    alerts = {
        **OFF,
        "cpu_percent": 0.0,
        "process_failed": False,
        "store_unreachable": False,
        "disk_free_percent": 99.99,
        "hold_seconds": 0.0,
    }
    url = f"{rx.base}/hook"
    app.sections["monitor"] = {**app.sections["monitor"], "sample_interval": 0.5, "alerts": alerts, "alert_webhook": url}
    app.sections["queue"] = {**app.sections["queue"], "callback_allow": ["127.0.0.1/32"]}
    app.config = write_config(app.data, **app.sections)
    secret = load_config(app.config).secrets.callback_secret
    app.start()
    try:
        assert wait_until(lambda: rx.paths("/hook"), timeout=30), app.lines()[-20:]
        got = rx.paths("/hook")[0]
        assert readme_verify()(secret, url, got["headers"], got["body"])
        assert outbound.verify(secret, url, got["body"], got["headers"]["X-Appliance-Timestamp"], got["headers"]["X-Appliance-Signature"])
        body = orjson.loads(got["body"])
        assert body["alert"] == "disk_free" and body["state"] == "firing" and body["threshold"] == 99.99 and body["node"]

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{app.monitor_port}/metrics", timeout=10) as r:
                return r.read().decode()

        assert wait_until(lambda: 'appliance_alert_webhook_total{result="sent"} 1.0' in metrics(), timeout=10)
    finally:
        app.stop()
