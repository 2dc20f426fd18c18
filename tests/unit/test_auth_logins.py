"""The login decision (appliance.logins) and what hangs on it, in-process on both engines:
the client address the workers trust, no oracle for disabled accounts, user names unique
ignoring case, every password or code check counted by the lockout, MFA changes revoking
sessions, and one-time recovery codes."""

from __future__ import annotations

import time

import pyotp
import pytest

from appliance import accounts, identity, logins
from appliance.db import ConstraintConflict, translated
from appliance.db.models import AuditEvent, RecoveryCode, TokenFamily, User
from tests.api_support import AUTH, PASSWORD, bearer, client_for, login, register

MAX_FAILURES = 4
ADDRESS_MAX_FAILURES = 6
LOCKOUT = 60


@pytest.fixture
def db_config(engine, make_config, request):
    auth = {
        **AUTH,
        "login_max_failures": MAX_FAILURES,
        "login_lockout_seconds": LOCKOUT,
        "login_address_max_failures": ADDRESS_MAX_FAILURES,
    }
    if engine == "postgresql":
        return make_config(auth=auth, database={"url": request.getfixturevalue("pg_url"), "max_connections": 8})
    return make_config(auth=auth)


@pytest.fixture
def client(db, db_config):
    return client_for(db_config)


def _post_login(client, name, password=PASSWORD, headers=None, remote_addr="127.0.0.1", **extra):
    body = {"username": name, "password": password, **extra}
    return client.simulate_post("/auth/login", json=body, headers=headers or {}, remote_addr=remote_addr)


def _last_address(event):
    return AuditEvent.select().where(AuditEvent.event == event).order_by(AuditEvent.id.desc()).first().address


def _reasons(event="login_failed"):
    return [e.details.get("reason") for e in AuditEvent.select().where(AuditEvent.event == event).order_by(AuditEvent.id)]


# --- item 7: the client address -------------------------------------------------------------


def test_the_signed_client_header_names_the_address_and_anything_else_falls_back_to_the_peer(client, db_config):
    key = identity.key_bytes(db_config.secrets.identity_key)
    register(client, "amy")
    signed = identity.sign_client("203.0.113.7", key)

    r = _post_login(client, "amy", headers={identity.CLIENT_HEADER: signed, "X-Forwarded-For": "198.51.100.1"})
    assert r.status_code == 200
    family = TokenFamily.select().order_by(TokenFamily.created_at.desc()).first()
    assert family.address == "203.0.113.7" and _last_address("login_success") == "203.0.113.7"

    mac = signed.rsplit(".", 1)[1]
    for headers in (
        {"X-Forwarded-For": "198.51.100.1"},  # any local process can send this: never trusted
        {identity.CLIENT_HEADER: identity.sign_client("203.0.113.8", b"not-the-identity-key")},
        {identity.CLIENT_HEADER: f"v1.203.0.113.9.{mac}"},  # another address under a real signature
        {identity.CLIENT_HEADER: "garbage"},
        {},
    ):
        r = _post_login(client, "amy", headers=headers, remote_addr="127.0.0.5")
        assert r.status_code == 200
        assert _last_address("login_success") == "127.0.0.5", headers


def test_lockout_of_one_signed_address_leaves_other_addresses_alone(client, db_config):
    key = identity.key_bytes(db_config.secrets.identity_key)
    register(client, "victim")
    attacker = {identity.CLIENT_HEADER: identity.sign_client("203.0.113.66", key)}
    for i in range(ADDRESS_MAX_FAILURES):  # different names: only the address counter reaches its limit
        assert _post_login(client, f"guess{i}", "Wrong-password-1", headers=attacker).status_code == 401
    r = _post_login(client, "victim", headers=attacker)
    assert r.status_code == 429 and r.json["error"]["code"] == "account_locked"
    other = {identity.CLIENT_HEADER: identity.sign_client("203.0.113.77", key)}
    assert _post_login(client, "victim", headers=other).status_code == 200
    assert _last_address("login_lockout") == "203.0.113.66"


# --- item 10: disabled accounts and user names ------------------------------------------------


def test_a_disabled_account_answers_exactly_as_a_wrong_password(client):
    register(client, "dora")
    user = User.get(User.username == "dora")
    user.mfa_secret, user.mfa_enabled = pyotp.random_base32(), True  # MFA must not answer first either
    user.save()
    accounts.set_active(user, False)
    right = _post_login(client, "dora", PASSWORD)
    wrong = _post_login(client, "dora", "Wrong-password-1")
    unknown = _post_login(client, "nobody-here", "Wrong-password-1")
    assert right.status_code == wrong.status_code == unknown.status_code == 401
    errors = [{k: v for k, v in r.json["error"].items() if k != "request_id"} for r in (right, wrong, unknown)]
    assert errors[0] == errors[1] == errors[2]
    assert right.json["error"]["code"] == "invalid_credentials"
    assert right.headers.get("www-authenticate") == wrong.headers.get("www-authenticate")
    assert _reasons() == ["account_disabled", "bad_password", "unknown_user"]  # the audit trail knows why


def test_user_names_are_unique_ignoring_case_and_login_ignores_case(client):
    register(client, "Sam")
    r = client.simulate_post("/auth/register", json={"username": "sam", "email": "other@example.com", "password": PASSWORD})
    assert r.status_code == 409 and r.json["error"]["code"] == "username_taken"
    with pytest.raises(accounts.AccountError) as exc:
        accounts.create_user("SAM", None, PASSWORD, rounds=10)
    assert exc.value.status == 409
    with pytest.raises(ConstraintConflict), translated():  # the unique index on lower(username) holds under races too
        User.create(username="sAm", email="s3@example.com", password_hash="x")
    data = login(client, "SAM")
    assert data["user"]["username"] == "Sam"
    assert accounts.get_user("sam").username == "Sam"


# --- item 9: every check of a password or code is counted -------------------------------------


def test_wrong_current_passwords_on_password_change_count_toward_the_lockout(client):
    register(client, "pat")
    token = login(client, "pat")["access_token"]
    for _ in range(MAX_FAILURES):
        r = client.simulate_post(
            "/auth/password", headers=bearer(token), json={"current_password": "Wrong-password-1", "new_password": "Another-pass-2"}
        )
        assert r.status_code == 400 and r.json["error"]["details"]["field"] == "current_password"
    r = _post_login(client, "pat")
    assert r.status_code == 429 and r.json["error"]["code"] == "account_locked" and int(r.headers["retry-after"]) >= 1
    r = client.simulate_post("/auth/password", headers=bearer(token), json={"current_password": PASSWORD, "new_password": "Another-pass-2"})
    assert r.status_code == 429
    assert _reasons("password_change_failed") == ["bad_password"] * MAX_FAILURES


def _enable_mfa(client, token):
    setup = client.simulate_post("/auth/mfa/setup", headers=bearer(token)).json["data"]
    totp = pyotp.TOTP(setup["secret"])
    r = client.simulate_post("/auth/mfa/enable", headers=bearer(token), json={"code": totp.at(time.time() - 30)})
    assert r.status_code == 200, r.text
    return totp, r.json["data"]


def test_mfa_disable_needs_password_and_code_and_wrong_passwords_count(client):
    register(client, "mia")
    totp, enabled = _enable_mfa(client, login(client, "mia")["access_token"])
    token = enabled["access_token"]
    r = client.simulate_post("/auth/mfa/disable", headers=bearer(token), json={"password": PASSWORD})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "code"
    r = client.simulate_post("/auth/mfa/disable", headers=bearer(token), json={"code": totp.now()})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "password"
    for _ in range(MAX_FAILURES):
        r = client.simulate_post("/auth/mfa/disable", headers=bearer(token), json={"password": "Wrong-password-1", "code": totp.now()})
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_password"
    r = client.simulate_post("/auth/mfa/disable", headers=bearer(token), json={"password": PASSWORD, "code": totp.now()})
    assert r.status_code == 429 and r.json["error"]["code"] == "account_locked"
    assert _post_login(client, "mia", mfa_token=totp.now()).status_code == 429
    assert User.get(User.username == "mia").mfa_enabled is True


def test_enabling_and_disabling_mfa_revoke_the_other_sessions_and_reissue_this_one(client):
    register(client, "ned")
    a, b = login(client, "ned"), login(client, "ned")
    totp, enabled = _enable_mfa(client, a["access_token"])
    assert enabled["token_type"] == "bearer" and len(enabled["recovery_codes"]) == 10
    for old in (a, b):
        assert client.simulate_get("/auth/profile", headers=bearer(old["access_token"])).status_code == 401
        assert client.simulate_post("/auth/refresh", json={"refresh_token": old["refresh_token"]}).status_code == 401
    assert client.simulate_get("/auth/profile", headers=bearer(enabled["access_token"])).status_code == 200
    c = login(client, "ned", mfa_token=totp.at(time.time()))
    r = client.simulate_post(
        "/auth/mfa/disable", headers=bearer(enabled["access_token"]), json={"password": PASSWORD, "code": totp.at(time.time() + 30)}
    )
    assert r.status_code == 200, r.text
    fresh = r.json["data"]
    for old in (enabled, c):
        assert client.simulate_get("/auth/profile", headers=bearer(old["access_token"])).status_code == 401
    assert client.simulate_get("/auth/profile", headers=bearer(fresh["access_token"])).status_code == 200
    assert client.simulate_post("/auth/refresh", json={"refresh_token": fresh["refresh_token"]}).status_code == 200


# --- item 9: recovery codes --------------------------------------------------------------------


def test_recovery_codes_are_shown_once_stored_hashed_and_work_once(client):
    register(client, "rex")
    totp, enabled = _enable_mfa(client, login(client, "rex")["access_token"])
    codes = enabled["recovery_codes"]
    assert len(set(codes)) == 10 and all(len(c) == 11 and c[5] == "-" for c in codes)
    uid = User.get(User.username == "rex").id
    stored = [row.code_hash for row in RecoveryCode.select().where(RecoveryCode.user == uid)]
    assert len(stored) == 10 and not any(c.replace("-", "") in h or c in h for c in codes for h in stored)

    data = login(client, "rex", mfa_token=codes[0].upper().replace("-", " "))  # case and separators do not matter
    r = _post_login(client, "rex", mfa_token=codes[0])
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_mfa_token", "a recovery code works once"
    assert AuditEvent.select().where(AuditEvent.event == "login_success").order_by(AuditEvent.id.desc()).first().details == {
        "method": "recovery_code",
        "recovery_codes_left": 9,
    }

    token = data["access_token"]
    r = client.simulate_post("/auth/mfa/recovery-codes", headers=bearer(token), json={"password": PASSWORD, "code": codes[1]})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "code", "regenerating needs the TOTP code itself"
    r = client.simulate_post("/auth/mfa/recovery-codes", headers=bearer(token), json={"password": PASSWORD, "code": totp.now()})
    assert r.status_code == 200
    new = r.json["data"]["recovery_codes"]
    assert len(new) == 10 and not set(new) & set(codes)
    assert _post_login(client, "rex", mfa_token=codes[2]).status_code == 401, "the old set is void"

    r = client.simulate_post("/auth/mfa/disable", headers=bearer(token), json={"password": PASSWORD, "code": new[0]})
    assert r.status_code == 200 and r.json["data"]["mfa_enabled"] is False
    assert RecoveryCode.select().where(RecoveryCode.user == uid).count() == 0
    login(client, "rex")


# --- logins.authenticate without Falcon, time as a parameter -----------------------------------


def test_authenticate_decides_without_falcon(db, db_config):
    accounts.create_user("lou", None, PASSWORD, rounds=10)
    events: list[str] = []

    def sink(event, **_kw):
        events.append(event)

    t = 1_900_000_000.0
    for _ in range(MAX_FAILURES):
        with pytest.raises(logins.LoginRefused) as refused:
            logins.authenticate(db_config, "lou", "Wrong-password-1", None, "10.0.0.9", audit=sink, now=t)
        assert (refused.value.status, refused.value.code, refused.value.message) == (401, "invalid_credentials", logins.BAD_LOGIN)
    with pytest.raises(logins.LoginRefused) as refused:
        logins.authenticate(db_config, "LOU", PASSWORD, None, "10.0.0.10", audit=sink, now=t + 1)
    assert refused.value.status == 429 and refused.value.code == "account_locked" and refused.value.retry_after == LOCKOUT - 1
    assert refused.value.headers["Retry-After"] == str(LOCKOUT - 1)
    user = logins.authenticate(db_config, "lou", PASSWORD, None, "10.0.0.10", audit=sink, now=t + LOCKOUT + 1)
    assert user.username == "lou" and user.login_count == 1
    assert events == ["login_failed"] * MAX_FAILURES + ["login_lockout", "login_refused_locked", "login_success"]
