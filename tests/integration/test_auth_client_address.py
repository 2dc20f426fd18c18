"""The workers know each client's real address through the real balancer (its signed
X-Appliance-Client header): failed logins from 127.0.0.2 lock that address only, and a login
from 127.0.0.3 (same user or another) goes through; audit rows and token families name the
real addresses, not the balancer's 127.0.0.1."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.api_support import PASSWORD
from tests.integration.supervised import Appliance

ATTACKER, ADMIN = "127.0.0.2", "127.0.0.3"
ADDRESS_LIMIT = 3


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    app = Appliance(
        tmp_path_factory.mktemp("client-address"),
        api_workers=2,
        task_workers=1,
        # the address limit is the one under test; the account limit is out of reach
        auth={"bcrypt_rounds": 10, "login_address_max_failures": ADDRESS_LIMIT, "login_max_failures": 1000},
    )
    app.start()
    for name, role in (("boss", ["--admin"]), ("worker", [])):
        r = app.cli("user", "create", name, *role, "--password-stdin", stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
    yield app
    assert app.stop() == 0


def _login(app: Appliance, source: str, username: str, password: str) -> tuple[int, dict]:
    """POST /auth/login through the balancer from a client socket bound to `source`."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=15, source_address=(source, 0))
    try:
        body = json.dumps({"username": username, "password": password})
        # a client's own X-Forwarded-For must not pick the address the workers see
        conn.request("POST", "/auth/login", body=body, headers={"Content-Type": "application/json", "X-Forwarded-For": ADMIN})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_failures_from_one_address_do_not_lock_out_another(appliance):
    for _ in range(ADDRESS_LIMIT):
        status, body = _login(appliance, ATTACKER, "boss", "Wrong-password-1")
        assert status == 401, body
    status, body = _login(appliance, ATTACKER, "worker", PASSWORD)
    assert status == 429 and body["error"]["code"] == "account_locked", "the attacker's address is locked"

    status, body = _login(appliance, ADMIN, "boss", PASSWORD)
    assert status == 200, f"the admin's address must not share the attacker's lockout: {body}"
    status, body = _login(appliance, ADMIN, "worker", PASSWORD)
    assert status == 200, body

    from appliance.config import load_config
    from appliance.db import open_database
    from appliance.db.models import AuditEvent, TokenFamily

    handle = open_database(load_config(appliance.config, env={}))
    try:
        lockouts = {e.address for e in AuditEvent.select().where(AuditEvent.event == "login_lockout")}
        successes = {e.address for e in AuditEvent.select().where(AuditEvent.event == "login_success")}
        families = {f.address for f in TokenFamily.select()}
    finally:
        handle.close()
    assert lockouts == {ATTACKER} and successes == {ADMIN} and families == {ADMIN}
