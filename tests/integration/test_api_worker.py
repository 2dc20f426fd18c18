"""Real waitress workers (`appliance _child api`) on SQLite and PostgreSQL, over real sockets."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pyotp
import pytest
import requests

from tests.api_support import PASSWORD, bearer, start_worker, worker_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "apps"
pytestmark = pytest.mark.slow


@pytest.fixture
def worker_cfg(engine, tmp_path, request):
    pg = request.getfixturevalue("pg_url") if engine == "postgresql" else None
    return worker_config(tmp_path / "data", pg_url=pg)


def _ok(r, status=200):
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"]
    return r.json()


def test_full_walk_through_a_real_worker(worker_cfg):
    w = start_worker(worker_cfg)
    try:
        name = "walk" + uuid.uuid4().hex[:8]
        _ok(w.post("/auth/register", json={"username": name, "email": f"{name}@example.com", "password": PASSWORD}))
        pair = _ok(w.post("/auth/login", json={"username": name, "password": PASSWORD}))["data"]
        me = _ok(w.get("/api/protected", headers=bearer(pair["access_token"])))["data"]
        assert me["user"]["username"] == name
        prof = _ok(w.put("/auth/profile", headers=bearer(pair["access_token"]), json={"full_name": "Walker", "department": "QA"}))
        assert prof["data"]["user"]["full_name"] == "Walker"
        # rotation, then reuse of the spent refresh token revokes the family
        rotated = _ok(w.post("/auth/refresh", headers=bearer(pair["refresh_token"])))["data"]
        assert rotated["refresh_token"] != pair["refresh_token"]
        reuse = w.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert reuse.status_code == 401 and reuse.json()["error"]["code"] == "token_reused"
        assert w.get("/api/protected", headers=bearer(rotated["access_token"])).status_code == 401
        # logout kills one session, logout-all every other
        s1 = _ok(w.post("/auth/login", json={"username": name, "password": PASSWORD}))["data"]
        s2 = _ok(w.post("/auth/login", json={"username": name, "password": PASSWORD}))["data"]
        _ok(w.post("/auth/logout", headers=bearer(s1["access_token"])))
        assert w.get("/api/protected", headers=bearer(s1["access_token"])).status_code == 401
        assert w.get("/api/protected", headers=bearer(s2["access_token"])).status_code == 200
        _ok(w.post("/auth/logout-all", headers=bearer(s2["access_token"])))
        assert w.get("/api/protected", headers=bearer(s2["access_token"])).status_code == 401
        # MFA
        s3 = _ok(w.post("/auth/login", json={"username": name, "password": PASSWORD}))["data"]
        secret = _ok(w.post("/auth/mfa/setup", headers=bearer(s3["access_token"])))["data"]["secret"]
        _ok(w.post("/auth/mfa/enable", headers=bearer(s3["access_token"]), json={"code": pyotp.TOTP(secret).at(time.time() - 30)}))
        without = w.post("/auth/login", json={"username": name, "password": PASSWORD})
        assert without.status_code == 401 and without.json()["error"]["code"] == "mfa_required"
        _ok(w.post("/auth/login", json={"username": name, "password": PASSWORD, "mfa_token": pyotp.TOTP(secret).now()}))
        # errors keep the envelope and headers through a real server
        r = w.get("/nowhere", headers={"X-Request-ID": "walk-404"})
        assert r.status_code == 404 and r.json()["error"]["request_id"] == "walk-404"
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        zipped = w.get("/openapi.json", headers={"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip" and zipped.json()["openapi"] == "3.1.0"
    finally:
        assert w.stop() == 0, w.output()[-2000:]


SLOW_APP = """
import time
from appliance.api import ok, operation


class Slow:
    @operation("sleeps a second", response=dict)
    def on_get(self, req, resp):
        time.sleep(1.0)
        ok(resp, {"slept": True})


def setup(app, ctx):
    app.add_route("/slow", Slow())
"""


def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "slow.py").write_text(SLOW_APP)
    w = start_worker(worker_config(tmp_path / "data", api={"apps_dir": str(apps)}))
    result = {}

    def call():
        result["r"] = requests.get(w.url + "/slow", timeout=10)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    w.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["data"] == {"slept": True}
    assert w.proc.wait(10) == 0, w.output()[-2000:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", w.port), timeout=1):
        pass
    assert "draining" in w.output()


def test_example_operator_app_through_a_real_worker(worker_cfg):
    w = start_worker(worker_cfg, env={"APPLIANCE_API__APPS_DIR": str(EXAMPLES)})
    try:
        name = "notes" + uuid.uuid4().hex[:8]
        _ok(w.post("/auth/register", json={"username": name, "email": f"{name}@example.com", "password": PASSWORD}))
        token = _ok(w.post("/auth/login", json={"username": name, "password": PASSWORD}))["data"]["access_token"]
        note = _ok(w.post("/api/notes", headers=bearer(token), json={"title": "first", "body": "hello"}), 201)["data"]
        listed = _ok(w.get("/api/notes", headers=bearer(token)))
        assert [n["title"] for n in listed["data"]] == ["first"] and listed["metadata"]["total"] == 1
        _ok(w.put(f"/api/notes/{note['id']}", headers=bearer(token), json={"title": "renamed"}))
        assert _ok(w.get(f"/api/notes/{note['id']}", headers=bearer(token)))["data"]["title"] == "renamed"
        missing = w.get("/api/notes/999999", headers=bearer(token))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "note_not_found"
        bad = w.post("/api/notes", headers=bearer(token), json={"title": ""})
        assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "title"
        assert w.get("/api/notes").status_code == 401
        doc = w.get("/openapi.json").json()
        assert {"get", "post"} <= set(doc["paths"]["/api/notes"]) and "NoteIn" in doc["components"]["schemas"]
        assert requests.delete(f"{w.url}/api/notes/{note['id']}", headers=bearer(token), timeout=10).status_code == 200
    finally:
        w.stop()


def test_broken_operator_app_stops_the_worker_naming_the_file(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "good.py").write_text("def setup(app, ctx):\n    pass\n")
    (apps / "broken.py").write_text("import nonexistent_module_xyz\n")
    w = start_worker(worker_config(tmp_path / "data", api={"apps_dir": str(apps)}), wait=False)
    assert w.proc.wait(30) == 3
    out = w.output()
    assert str(apps / "broken.py") in out and "nonexistent_module_xyz" in out


def test_metrics_and_node_ids_span_workers(tmp_path):
    cfg = worker_config(tmp_path / "data", api={"workers": 2})
    w0, w1 = start_worker(cfg, 0), start_worker(cfg, 1)
    try:
        assert w0.get("/health/ping").json()["node_id"].endswith(":api:0")
        assert w1.get("/health/ping").json()["node_id"].endswith(":api:1")
        for _ in range(7):
            w1.get("/api/status")
        from appliance import accounts, db
        from appliance.config import load_config

        c = load_config(cfg, env={})
        handle = db.open_database(c)
        accounts.create_user("madmin", None, PASSWORD, role="admin", rounds=10)
        handle.close()
        token = w0.post("/auth/login", json={"username": "madmin", "password": PASSWORD}).json()["data"]["access_token"]
        data = w0.get("/api/metrics", headers=bearer(token)).json()["data"]
        status = [e for e in data["endpoint_statistics"] if e["route"] == "/api/status"][0]
        assert status["requests"] >= 7  # counted by worker 1, reported by worker 0
        assert data["api_metrics"]["total_requests"] >= 10 and data["workers"] == 2
    finally:
        w0.stop()
        w1.stop()


def test_bcrypt_does_not_block_other_requests(tmp_path):
    cfg = worker_config(tmp_path / "data", auth={"bcrypt_rounds": 13}, api={"threads": 6})
    w = start_worker(cfg)
    try:
        from appliance import accounts, db
        from appliance.config import load_config

        handle = db.open_database(load_config(cfg, env={}))
        accounts.create_user("slowhash", None, PASSWORD, rounds=13)
        handle.close()
        t = time.perf_counter()
        w.post("/auth/login", json={"username": "slowhash", "password": PASSWORD})
        one_login = time.perf_counter() - t
        stop = threading.Event()

        def logins():
            while not stop.is_set():
                w.post("/auth/login", json={"username": "slowhash", "password": PASSWORD})

        threads = [threading.Thread(target=logins) for _ in range(3)]
        for th in threads:
            th.start()
        time.sleep(0.2)
        pings = []
        for _ in range(10):
            t = time.perf_counter()
            assert w.get("/health/ping").status_code == 200
            pings.append(time.perf_counter() - t)
        stop.set()
        for th in threads:
            th.join(30)
        pings.sort()
        # a ping waits for no hash: the median stays far below one login's bcrypt time
        assert pings[len(pings) // 2] < one_login / 2, (pings, one_login)
    finally:
        w.stop()


def test_health_status_503_while_database_is_down_and_recovers(tmp_path, pg_url):
    """PostgreSQL behind a TCP relay we control: cut it, see 503, restore it, see 200."""
    import urllib.parse

    from tests.api_support import Relay

    p = urllib.parse.urlparse(pg_url)
    relay = Relay(p.hostname, p.port or 5432)
    relay.start()
    url = urllib.parse.urlunparse(p._replace(netloc=f"{p.username}:{p.password}@127.0.0.1:{relay.port}"))
    w = start_worker(worker_config(tmp_path / "data", pg_url=url))
    try:
        assert w.get("/health/status").status_code == 200
        relay.stop()
        down = w.get("/health/status", timeout=30)
        assert down.status_code == 503 and down.json()["checks"]["database"]["status"] == "unhealthy"
        assert down.json()["status"] == "unhealthy"
        relay.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and w.get("/health/status", timeout=30).status_code != 200:
            time.sleep(0.3)
        assert w.get("/health/status", timeout=30).status_code == 200
    finally:
        w.stop()
        relay.stop()
