"""The monitor's pure parts: ring buffers, rates, quantiles, alert hold times, sessions and CSRF checks."""

from __future__ import annotations

import logging

import pytest

from appliance.config import AlertSettings
from appliance.monitor.alerts import Alerts
from appliance.monitor.history import History, Rates, quantile
from appliance.monitor.sessions import Sessions, cookie, csrf_ok, read_cookie, same_site


def test_history_keeps_one_hour_and_never_more() -> None:
    h = History(3600, 2.0)
    for i in range(5000):
        h.add({"t": float(i)})
    assert len(h) == 1800 == h.maxlen
    assert h.since(0)[0]["t"] == 3200.0
    assert [p["t"] for p in h.since(4997)] == [4998.0, 4999.0]


def test_rates_are_per_second_and_survive_a_counter_reset() -> None:
    r = Rates()
    assert r.update(100.0, {"a": 10.0}) == {"a": 0.0}  # no interval yet
    assert r.update(102.0, {"a": 30.0}) == {"a": 10.0}
    assert r.update(104.0, {"a": 4.0}) == {"a": 2.0}  # restarted from zero: counted from zero, never negative


def test_quantile_interpolates_within_buckets() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.7) == pytest.approx(0.3)
    assert quantile(buckets, 0.99) == pytest.approx(0.95)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.5) == 0.1  # beyond the last bound: that bound


def _sample(cpu: float) -> dict:
    return {"host": {"cpu": cpu, "memory": {"percent": 10}, "disk": {"free_percent": 50}}, "database": {"reachable": True}, "redis": None}


def test_an_alert_fires_only_after_its_hold_time_and_does_not_flap(caplog: pytest.LogCaptureFixture) -> None:
    alerts = Alerts(AlertSettings(hold_seconds=30, cpu_percent=90))
    caplog.set_level(logging.WARNING, logger="appliance.alerts")
    assert alerts.evaluate(_sample(95), 0) == []
    assert alerts.evaluate(_sample(50), 10) == []  # a spike shorter than the hold: nothing
    assert alerts.evaluate(_sample(95), 20) == []
    assert alerts.evaluate(_sample(95), 49) == []
    fired = alerts.evaluate(_sample(96), 50)
    assert [(c["alert"], c["state"]) for c in fired] == [("host_cpu", "firing")]
    assert "host_cpu" in alerts.firing
    for t in (55, 60, 65):  # hovering around the threshold: still one alert
        assert alerts.evaluate(_sample(80 if t % 10 else 95), t) == []
    assert alerts.evaluate(_sample(50), 70) == []
    resolved = alerts.evaluate(_sample(50), 100)
    assert [(c["alert"], c["state"]) for c in resolved] == [("host_cpu", "resolved")]
    assert alerts.view()["firing"] == [] and len(alerts.view()["recent"]) == 2
    lines = [r for r in caplog.records if r.name == "appliance.alerts"]
    assert [r.fields["state"] for r in lines] == ["firing", "resolved"]  # one log line per transition


def test_store_and_process_alerts() -> None:
    alerts = Alerts(AlertSettings(hold_seconds=0))
    sample = {
        "database": {"reachable": False},
        "redis": {"reachable": True},
        "processes": {"rows": [{"role": "api", "index": 1, "state": "failed"}]},
        "security": {"failed_logins_per_min": 40},  # from the audit trail: API and status page logins alike
    }
    names = {c["alert"]: c["value"] for c in alerts.evaluate(sample, 0)}
    assert names == {"store_unreachable": "database", "process_failed": "api[1]", "login_failures": 40}


def test_sessions_expire_on_the_server_and_forged_ids_match_nothing() -> None:
    s = Sessions(60.0, b"k" * 32)
    sid, session = s.create(1, "root", 0, now=1000.0)
    assert s.get(sid, now=1059.0) is session
    assert s.get(sid + "x", now=1000.0) is None
    assert s.get("", now=1000.0) is None
    assert s.get(sid, now=1060.0) is None  # expired: dropped server-side, whatever the cookie's Max-Age
    assert s.get(sid, now=1000.0) is None  # and gone for good
    a, _ = s.create(1, "root", 0, now=2000.0)
    b, _ = s.create(1, "root", 0, now=2000.0)
    assert a != b  # a new id at every login
    s.drop_user(1)
    assert s.get(a, now=2000.0) is None and s.get(b, now=2000.0) is None


def test_the_session_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.monitor.sessions.MAX_SESSIONS", 10)
    s = Sessions(60.0, b"k" * 32)
    for i in range(25):
        s.create(i, "u", 0, now=1000.0 + i)
    assert len(s) == 10


def test_csrf_tokens_and_origin_checks() -> None:
    s = Sessions(60.0, b"k" * 32)
    assert s.login_token_ok("pre", s.login_token("pre"))
    assert not s.login_token_ok("pre", s.login_token("other"))
    assert not s.login_token_ok(None, s.login_token("pre"))
    assert not s.login_token_ok("pre", "")
    _, session = s.create(1, "root", 0)
    assert csrf_ok(session, session.csrf) and not csrf_ok(session, "nope") and not csrf_ok(session, None)
    host = {"HTTP_HOST": "status.example:8080"}
    assert same_site(host)
    assert same_site({**host, "HTTP_ORIGIN": "http://status.example:8080", "HTTP_SEC_FETCH_SITE": "same-origin"})
    assert not same_site({**host, "HTTP_ORIGIN": "https://evil.example"})
    assert not same_site({**host, "HTTP_ORIGIN": "null"})
    assert not same_site({**host, "HTTP_SEC_FETCH_SITE": "cross-site"})
    assert not same_site({**host, "HTTP_SEC_FETCH_SITE": "same-site"})


def test_cookie_flags() -> None:
    plain = cookie("appliance_status", "v", secure=False, max_age=60)
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Secure" not in plain and "Path=/status" in plain
    tls = cookie("appliance_status", "v", secure=True)
    assert tls.startswith("__Host-appliance_status=v") and "; Secure" in tls and "Path=/;" in tls
    env = {"HTTP_COOKIE": "a=1; __Host-appliance_status=abc; appliance_status=plain"}
    assert read_cookie(env, "appliance_status", secure=True) == "abc"
    assert read_cookie(env, "appliance_status", secure=False) == "plain"


def test_the_login_address_is_the_balancers_signed_word_or_the_socket_peer(make_config) -> None:
    from appliance import identity
    from appliance.monitor.web import StatusSite

    cfg = make_config()
    site = StatusSite(cfg, sampler=None, db=None)
    key = identity.key_bytes(cfg.secrets.identity_key)
    peer = {"REMOTE_ADDR": "127.0.0.1"}
    assert site._address({**peer, "HTTP_X_APPLIANCE_CLIENT": identity.sign_client("203.0.113.7", key)}) == "203.0.113.7"
    forged = identity.sign_client("203.0.113.7", b"not-the-key" * 4)
    assert site._address({**peer, "HTTP_X_APPLIANCE_CLIENT": forged}) == "127.0.0.1"
    assert site._address(peer) == "127.0.0.1"


def test_overview_levels_and_reasons() -> None:
    from appliance.monitor.sampler import overview

    def row(role: str, index: int, state: str = "up", restarts: int = 0, uptime: float = 500.0) -> dict:
        return {"role": role, "index": index, "state": state, "restarts": restarts, "uptime": uptime}

    sample = {
        "processes": {
            "rows": [
                row("api", 0),
                row("api", 1, "backoff"),
                row("worker", 0, restarts=1, uptime=12),
                row("scheduler", 0, "failed"),
                row("balancer", 0, restarts=3, uptime=3000),
            ]
        },
        "database": {"reachable": False, "error": "OperationalError: connection refused"},
        "redis": {"reachable": True},
        "host": {"disk": {"free_percent": 8.0}},
    }
    lines = {x["name"]: x for x in overview(sample)}
    assert lines["api"]["level"] == "amber" and lines["api"]["reason"] == "api[1] backoff"
    assert lines["worker"]["level"] == "amber" and "worker[0] restarted 12 s ago" in lines["worker"]["reason"]
    assert lines["scheduler"]["level"] == "red"
    assert lines["balancer"]["level"] == "green"  # restarts long ago: counted, not marked
    assert lines["database"]["level"] == "red" and "connection refused" in lines["database"]["reason"]
    assert lines["redis"]["level"] == "green"
    assert lines["disk"]["level"] == "red" and lines["disk"]["reason"] == "8.0 % free"
    assert "hosts" not in lines  # one host: no cluster line
    assert lines["api"]["detail"] == "2 process(es), 0 restart(s)"


def test_overview_line_of_the_monitor_says_it_runs_the_scheduler() -> None:
    from appliance.monitor.sampler import overview

    rows = [{"role": "monitor", "index": 0, "state": "up", "restarts": 1, "uptime": 500.0, "jobs": ["scheduler"]}]
    lines = {x["name"]: x for x in overview({"processes": {"rows": rows}})}
    assert lines["monitor"]["detail"] == "1 process(es), 1 restart(s), also runs the scheduler"
    assert lines["monitor"]["level"] == "green" and "scheduler" not in lines


def test_overview_has_a_cluster_line_once_a_second_host_beats() -> None:
    from appliance.monitor.sampler import overview

    def hosts(*states: str) -> dict:
        return {"cluster": {"hosts": [{"host": f"h{i}", "state": s} for i, s in enumerate(states)]}}

    line = {x["name"]: x for x in overview(hosts("up", "down", "up"))}["hosts"]
    assert line["level"] == "amber" and line["reason"] == "down: h1" and line["detail"] == "2 of 3 up"
    assert {x["name"]: x for x in overview(hosts("up", "stopped"))}["hosts"]["level"] == "green"
    assert {x["name"]: x for x in overview(hosts("down", "down"))}["hosts"]["level"] == "red"
