"""Auth, sessions, MFA, users and metrics endpoints in-process on both engines; pure logic with time as a parameter."""

from __future__ import annotations

import datetime as _dt
import logging
import time

import pyotp
import pytest

from appliance.api.server import QueueWarningFilter
from appliance.api.stats import RateWindow
from appliance.db.models import AuditEvent
from appliance.secondfactor import verify_code
from appliance.throttle import LoginGuard
from tests.api_support import AUTH, PASSWORD, bearer, client_for, login, register, user_token


@pytest.fixture
def db_config(engine, make_config, request):
    auth = {**AUTH, "login_max_failures": 3, "login_lockout_seconds": 60, "login_address_max_failures": 50}
    if engine == "postgresql":
        return make_config(auth=auth, database={"url": request.getfixturevalue("pg_url"), "max_connections": 8})
    return make_config(auth=auth)


@pytest.fixture
def client(db, db_config):
    return client_for(db_config)


def _events(name):
    return AuditEvent.select().where(AuditEvent.event == name).count()


def test_unknown_user_and_wrong_password_look_the_same(client):
    register(client, "carol")
    a = client.simulate_post("/auth/login", json={"username": "carol", "password": "Wrong-password-1"})
    b = client.simulate_post("/auth/login", json={"username": "nobody", "password": "Wrong-password-1"})
    assert a.status_code == b.status_code == 401
    assert a.json["error"]["code"] == b.json["error"]["code"] == "invalid_credentials"
    assert a.json["error"]["message"] == b.json["error"]["message"]

    # same time: both check one bcrypt hash of the configured cost
    def timed(name):
        t = time.perf_counter()
        client.simulate_post("/auth/login", json={"username": name, "password": "Wrong-password-1"})
        return time.perf_counter() - t

    known = min(timed("carol") for _ in range(2))
    unknown = min(timed(f"ghost{i}") for i in range(2))
    assert 0.3 < unknown / known < 3.0, (known, unknown)
    assert _events("login_failed") >= 4


def test_lockout_per_account_with_retry_after_and_reset_on_success(client):
    register(client, "dave")
    for _ in range(2):
        client.simulate_post("/auth/login", json={"username": "dave", "password": "Wrong-password-1"})
    login(client, "dave")  # success resets the account counter
    for _ in range(3):
        r = client.simulate_post("/auth/login", json={"username": "dave", "password": "Wrong-password-1"})
        assert r.status_code == 401
    r = client.simulate_post("/auth/login", json={"username": "dave", "password": PASSWORD})
    assert r.status_code == 429 and r.json["error"]["code"] == "account_locked"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert _events("login_lockout") == 1 and _events("login_refused_locked") == 1


def test_guard_logic_with_time_as_parameter(db):
    guard = LoginGuard(max_failures=2, address_max_failures=3, lockout_seconds=30)
    t0 = _dt.datetime(2030, 1, 1)
    assert guard.failure("eve", "10.0.0.1", now=t0) == []
    assert guard.failure("eve", "10.0.0.1", now=t0) == ["user"]
    assert guard.retry_after("eve", "10.0.0.2", now=t0 + _dt.timedelta(seconds=10)) == 20
    assert guard.retry_after("eve", "10.0.0.2", now=t0 + _dt.timedelta(seconds=31)) == 0
    # the address reaches its own limit across different account names
    assert guard.failure("frank", "10.0.0.1", now=t0) == ["addr"]
    assert guard.retry_after("someone-else", "10.0.0.1", now=t0 + _dt.timedelta(seconds=1)) == 29
    # old failures fall out of the window
    guard.failure("gina", "", now=t0)
    assert guard.failure("gina", "", now=t0 + _dt.timedelta(seconds=61)) == []
    assert guard.failure("x" * 5000, "", now=t0) == []  # huge names keep a bounded key


def test_refresh_rotation_reuse_and_logout(client):
    register(client, "hank")
    pair = login(client, "hank")
    r = client.simulate_post("/auth/refresh", headers=bearer(pair["refresh_token"]))
    assert r.status_code == 200
    new = r.json["data"]
    assert new["refresh_token"] != pair["refresh_token"] and new["token_type"] == "bearer"
    assert client.simulate_get("/api/protected", headers=bearer(new["access_token"])).status_code == 200
    # reuse of the spent token: the whole family dies, access tokens included
    r = client.simulate_post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert r.status_code == 401 and r.json["error"]["code"] == "token_reused"
    assert client.simulate_post("/auth/refresh", json={"refresh_token": new["refresh_token"]}).status_code == 401
    assert client.simulate_get("/api/protected", headers=bearer(new["access_token"])).status_code == 401
    assert _events("refresh_token_reuse") == 1
    # logout revokes the access token and its family; another session survives until logout-all
    s1, s2 = login(client, "hank"), login(client, "hank")
    assert client.simulate_post("/auth/logout", headers=bearer(s1["access_token"])).status_code == 200
    assert client.simulate_get("/auth/validate", headers=bearer(s1["access_token"])).status_code == 401
    assert client.simulate_post("/auth/refresh", json={"refresh_token": s1["refresh_token"]}).status_code == 401
    assert client.simulate_get("/auth/validate", headers=bearer(s2["access_token"])).status_code == 200
    assert client.simulate_post("/auth/logout-all", headers=bearer(s2["access_token"])).status_code == 200
    assert client.simulate_get("/auth/validate", headers=bearer(s2["access_token"])).status_code == 401
    assert client.simulate_post("/auth/refresh", json={"refresh_token": s2["refresh_token"]}).status_code == 401


def test_profile_and_password_change(client):
    register(client, "ivy")
    token = login(client, "ivy")["access_token"]
    prof = client.simulate_get("/auth/profile", headers=bearer(token)).json["data"]
    assert prof["user"]["permissions"] and prof["statistics"]["tasks_submitted"] == 0
    r = client.simulate_put(
        "/auth/profile", headers=bearer(token), json={"full_name": "Ivy I", "department": "R&D", "preferences": {"theme": "dark"}}
    )
    assert r.status_code == 200 and r.json["data"]["user"]["full_name"] == "Ivy I" and r.json["data"]["preferences"] == {"theme": "dark"}
    r = client.simulate_put("/auth/profile", headers=bearer(token), json={"preferences": {f"k{i}": i for i in range(60)}})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "preferences"
    register(client, "ivy2")
    r = client.simulate_put("/auth/profile", headers=bearer(token), json={"email": "ivy2@example.com"})
    assert r.status_code == 409
    r = client.simulate_post(
        "/auth/password", headers=bearer(token), json={"current_password": "nope-nope-1", "new_password": "Another-pass-2"}
    )
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "current_password"
    r = client.simulate_post("/auth/password", headers=bearer(token), json={"current_password": PASSWORD, "new_password": "Another-pass-2"})
    assert r.status_code == 200
    assert client.simulate_get("/auth/profile", headers=bearer(token)).status_code == 401  # old tokens die
    assert client.simulate_get("/auth/profile", headers=bearer(r.json["data"]["access_token"])).status_code == 200
    login(client, "ivy", "Another-pass-2")


def test_mfa_setup_enable_login_disable(client):
    register(client, "jack")
    token = login(client, "jack")["access_token"]
    setup = client.simulate_post("/auth/mfa/setup", headers=bearer(token)).json["data"]
    assert setup["otpauth_uri"].startswith("otpauth://totp/") and "jack" in setup["otpauth_uri"]
    totp = pyotp.TOTP(setup["secret"])
    r = client.simulate_post("/auth/mfa/enable", headers=bearer(token), json={"code": "000000" if totp.now() != "000000" else "111111"})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_mfa_token"
    previous_step = totp.at(time.time() - 30)  # valid (±1 step) and a different step from the login below
    assert client.simulate_post("/auth/mfa/enable", headers=bearer(token), json={"code": previous_step}).status_code == 200
    r = client.simulate_post("/auth/login", json={"username": "jack", "password": PASSWORD})
    assert r.status_code == 401 and r.json["error"]["code"] == "mfa_required"
    r = client.simulate_post("/auth/login", json={"username": "jack", "password": PASSWORD, "mfa_token": "12345x"})
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_mfa_token"
    code = totp.now()
    data = login(client, "jack", mfa_token=code)
    assert data["user"]["mfa_enabled"] is True
    r = client.simulate_post("/auth/login", json={"username": "jack", "password": PASSWORD, "mfa_token": code})
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_mfa_token", "a TOTP code must work once"
    r = client.simulate_post("/auth/mfa/disable", headers=bearer(data["access_token"]), json={"password": PASSWORD})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "code", "the password alone must not turn MFA off"
    r = client.simulate_post(
        "/auth/mfa/disable", headers=bearer(data["access_token"]), json={"password": PASSWORD, "code": totp.at(time.time() + 30)}
    )
    assert r.status_code == 200 and r.json["data"]["mfa_enabled"] is False
    login(client, "jack")


def test_totp_window_is_one_step():
    secret = pyotp.random_base32()
    t = 1_900_000_000
    code = pyotp.TOTP(secret).at(t)
    assert verify_code(secret, code, at=t) and verify_code(secret, code, at=t + 30) and verify_code(secret, code, at=t - 30)
    assert not verify_code(secret, code, at=t + 90) and not verify_code(secret, "abc", at=t) and not verify_code(None, code, at=t)


def test_users_admin_routes(client):
    admin = user_token(client, "boss", role="admin")
    uid = register(client, "kim")["id"]
    kim = login(client, "kim")["access_token"]
    r = client.simulate_get("/api/users", headers=bearer(admin), params={"page": "1", "per_page": "1"})
    assert r.status_code == 200 and r.json["metadata"] == {"page": 1, "per_page": 1, "total": 2, "pages": 2}
    assert client.simulate_get("/api/users", headers=bearer(admin), params={"per_page": "0"}).status_code == 400
    assert client.simulate_get(f"/api/users/{uid}", headers=bearer(kim)).status_code == 200  # self
    assert client.simulate_get("/api/users/1", headers=bearer(kim)).status_code == 403
    assert client.simulate_get("/api/users/999", headers=bearer(admin)).status_code == 404
    r = client.simulate_patch(f"/api/users/{uid}", headers=bearer(admin), json={"is_active": False})
    assert r.status_code == 200 and r.json["data"]["user"]["is_active"] is False
    assert client.simulate_get("/api/protected", headers=bearer(kim)).status_code == 401  # disabled: tokens revoked
    r = client.simulate_post("/auth/login", json={"username": "kim", "password": PASSWORD})
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_credentials"  # as a wrong password: no oracle
    assert client.simulate_patch("/api/users/1", headers=bearer(admin), json={"role": "user"}).status_code == 409
    assert client.simulate_patch(f"/api/users/{uid}", headers=bearer(admin), json={"role": "root"}).status_code == 400


def test_metrics_counts_requests(client):
    admin = user_token(client, "metrics_admin", role="admin")
    for _ in range(3):
        client.simulate_get("/api/status")
    data = client.simulate_get("/api/metrics", headers=bearer(admin)).json["data"]
    routes = {(e["method"], e["route"]): e for e in data["endpoint_statistics"]}
    assert routes[("GET", "/api/status")]["requests"] >= 3
    assert data["api_metrics"]["total_requests"] >= 5 and data["api_metrics"]["active_users"] >= 1
    assert data["user_activity"]["logins_24h"] >= 1 and "cpu" in data["system_health"]


def test_rate_window_and_queue_warning_filter():
    w = RateWindow()
    assert w.rate(100.0, 50, since=40.0) == 50.0  # no history: average since start (60 s)
    assert w.rate(130.0, 80, since=40.0) == 60.0  # 30 requests in 30 s
    clock = [0.0]
    f = QueueWarningFilter(interval=10.0, clock=lambda: clock[0])
    rec = lambda d: logging.LogRecord("waitress.queue", logging.WARNING, "", 0, "Task queue depth is %d", (d,), None)  # noqa: E731
    assert f.filter(rec(1))
    assert not any(f.filter(rec(i)) for i in range(2, 50))
    clock[0] = 11.0
    r = rec(3)
    assert f.filter(r) and "48 similar" in r.getMessage() and "deepest 49" in r.getMessage()


def test_a_totp_step_is_accepted_once_and_never_an_older_one(db):
    from appliance import accounts
    from appliance.secondfactor import consume_code

    user = accounts.create_user("kim", None, "Correct-horse-9", rounds=10)
    secret = pyotp.random_base32()
    user.mfa_secret = secret
    user.save()
    totp, t = pyotp.TOTP(secret), 1_900_000_000
    assert consume_code(user, totp.at(t), at=t)
    assert not consume_code(user, totp.at(t), at=t)  # replay of the same step
    assert not consume_code(user, totp.at(t - 30), at=t)  # an older step, still inside the window
    assert consume_code(user, totp.at(t + 30), at=t + 30)
