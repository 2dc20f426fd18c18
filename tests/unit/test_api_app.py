"""The API framework in-process on both engines: envelope, errors, headers, identity, tokens, OpenAPI, fuzz."""

from __future__ import annotations

import gzip
import time

import falcon
import jwt
import peewee as pw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import accounts, identity, tokens
from appliance.api import openapi
from appliance.db import errors as dberrors
from tests.api_support import AUTH, bearer, client_for, register, user_token


@pytest.fixture
def db_config(engine, make_config, request):
    if engine == "postgresql":
        url = request.getfixturevalue("pg_url")
        return make_config(auth=AUTH, api={"gzip_min_bytes": 512}, database={"url": url, "max_connections": 8})
    return make_config(auth=AUTH, api={"gzip_min_bytes": 512})


@pytest.fixture
def client(db, db_config):
    return client_for(db_config)


def _envelope_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json
    assert body["status"] == "error"
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    if code:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in r.text
    return body["error"]


def test_falcon_errors_use_the_envelope(client):
    _envelope_error(client.simulate_get("/no/such/route"), 404, "not_found")
    err = _envelope_error(client.simulate_delete("/health/ping"), 405, "method_not_allowed")
    assert "DELETE" in err["message"]
    _envelope_error(client.simulate_post("/auth/login", body=b"{nope", headers={"Content-Type": "application/json"}), 400, "invalid_json")
    _envelope_error(client.simulate_post("/auth/login", body=b"a=b", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    big = b'{"username": "' + b"a" * 1_100_000 + b'"}'
    _envelope_error(client.simulate_post("/auth/login", body=big, headers={"Content-Type": "application/json"}), 413, "payload_too_large")
    _envelope_error(client.simulate_get("/api/users/notanumber"), 404, "not_found")


def test_validation_errors_name_the_field(client):
    err = _envelope_error(client.simulate_post("/auth/login", json={"username": 5, "password": "x"}), 400, "validation_error")
    assert err["details"]["field"] == "username"
    err = _envelope_error(client.simulate_post("/auth/login", json={"username": "bob"}), 400, "validation_error")
    assert err["details"]["field"] == "password"
    err = _envelope_error(
        client.simulate_post("/auth/register", json={"username": "ok_name", "email": "nope", "password": "Abcdefgh12"}), 400
    )
    assert err["details"]["field"] == "email"


def test_unexpected_exceptions_become_500_without_details(db_config, db, caplog):
    from appliance.api.app import create_app

    app = create_app(db_config)

    class Boom:
        def on_get(self, req, resp):
            raise RuntimeError("secret internals /etc/passwd")

    app.add_route("/boom", Boom())
    r = falcon.testing.TestClient(app).simulate_get("/boom", headers={"X-Request-ID": "trace-me-1"})
    err = _envelope_error(r, 500, "internal_error")
    assert "secret internals" not in r.text and err["request_id"] == "trace-me-1"
    assert any("secret internals" in (rec.exc_text or str(rec.exc_info)) for rec in caplog.records if rec.exc_info)


def test_every_error_of_the_core_is_an_app_error():
    from appliance import accounts, errors, logins
    from appliance.db import errors as dberrors

    for cls in (accounts.AccountError, tokens.TokenError, identity.IdentityError, logins.LoginRefused, dberrors.DatabaseError):
        assert issubclass(cls, errors.AppError), cls
    assert not hasattr(dberrors, "Conflict")  # one class named Conflict: appliance.errors.Conflict
    refused = identity.IdentityError("identity header is stale")
    assert (refused.status, refused.code, refused.message, str(refused)) == (
        401,
        "invalid_identity",
        "the identity header is not valid",
        "identity header is stale",
    )


@pytest.mark.parametrize(
    ("raised", "status", "code", "message"),
    [
        (
            lambda: pw.OperationalError("could not connect to server at 10.0.0.5"),
            503,
            "database_unavailable",
            "the database is not available",
        ),
        (lambda: pw.InterfaceError("connection already closed"), 503, "database_unavailable", "the database is not available"),
        (lambda: pw.IntegrityError("UNIQUE constraint failed: user.email"), 409, "conflict", "the change conflicts"),
        (lambda: pw.ProgrammingError('syntax error at or near "SELEKT"'), 500, "internal_error", "the server hit an unexpected error"),
        (lambda: dberrors.DatabaseUnavailable("database is locked"), 503, "database_unavailable", "the database is not available"),
        (lambda: accounts.AccountError("email_taken", "email is already registered", "email", 409), 409, "email_taken", "email is"),
        (lambda: tokens.TokenError("token_expired", "token has expired"), 401, "token_expired", "token has expired"),
    ],
)
def test_core_and_raw_database_errors_answer_their_envelope(db_config, db, raised, status, code, message):
    """Raw peewee errors are translated in appliance.db.errors; no driver text reaches the client."""
    from appliance.api.app import create_app

    app = create_app(db_config)

    class Raise:
        def on_get(self, req, resp):
            raise raised()

    app.add_route("/raise", Raise())
    r = falcon.testing.TestClient(app).simulate_get("/raise")
    err = _envelope_error(r, status, code)
    assert err["message"].startswith(message), err
    assert not any(word in r.text for word in ("10.0.0.5", "UNIQUE", "SELEKT", "locked", "closed"))
    if status == 503:
        assert r.headers["retry-after"] == "2"
    if code == "email_taken":
        assert err["details"] == {"field": "email"}
    if code == "token_expired":
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_request_id_echoed_or_generated(client):
    assert client.simulate_get("/health/ping", headers={"X-Request-ID": "abc.DEF-1_2"}).headers["x-request-id"] == "abc.DEF-1_2"
    made = client.simulate_get("/health/ping", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert made != "bad id with spaces" and len(made) == 32


def test_security_headers_and_no_store_on_auth(client):
    r = client.simulate_get("/api/status")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"]
    assert "cache-control" not in r.headers
    r = client.simulate_post("/auth/login", json={"username": "x", "password": "y"})
    assert r.headers["cache-control"] == "no-store"


def test_gzip_over_threshold_when_accepted(client):
    plain = client.simulate_get("/openapi.json")
    assert "content-encoding" not in plain.headers
    zipped = client.simulate_get("/openapi.json", headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped.content) == plain.content
    small = client.simulate_get("/health/ping", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers


def test_envelope_and_public_routes(client):
    r = client.simulate_get("/api/status")
    assert r.status_code == 200 and r.json["status"] == "success"
    assert r.json["data"]["node_id"].endswith(":api:0")
    ping = client.simulate_get("/health/ping").json
    assert ping["status"] == "ok" and ping["node_id"] and ping["timestamp"].endswith("Z")
    status = client.simulate_get("/health/status")
    assert status.status_code == 200 and status.json["checks"]["database"]["status"] == "healthy"
    assert isinstance(status.json["checks"]["database"]["response_time"], float)
    assert {"uptime", "cpu", "memory", "disk", "load_average"} <= set(status.json["system"])


def test_health_nodes_reads_heartbeats(client, db_config):
    from appliance.db.models import NodeHeartbeat
    from appliance.times import utcnow

    NodeHeartbeat.create(node_id="h1:api:0", role="api", host="h1", pid=10, status="running", cpu=1.5, rss=1000)
    NodeHeartbeat.create(
        node_id="h1:worker:0", role="worker", host="h1", pid=11, status="running", last_heartbeat=utcnow().replace(year=2000)
    )
    data = client.simulate_get("/health/nodes").json["data"]
    assert data["total_nodes"] == 2 and data["active_nodes"] == 1
    stale = [n for n in data["nodes"] if n["node_id"] == "h1:worker:0"][0]
    assert stale["stale"] and stale["status"] == "stale"


# --- identity and token attacks ----------------------------------------------------------


def _forge(claims_over=None, key="k" * 40, alg="HS256", settings=None, header=None):
    now = int(time.time())
    claims = {"sub": "1", "usr": "mallory", "role": "admin", "typ": "access", "gen": 0, "fam": "f", "jti": "j"}
    claims.update(iat=now, nbf=now, exp=now + 600, iss=settings.issuer, aud=settings.audience)
    claims.update(claims_over or {})
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def test_token_attacks_are_401(client, db_config):
    admin_token = user_token(client, "root1", role="admin")
    s = tokens.TokenSettings.from_config(db_config)
    key = db_config.secrets.jwt_secret
    header, payload, _sig = admin_token.split(".")
    import base64

    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    attacks = {
        "alg none": f"{none_header}.{payload}.",
        "other alg": _forge(key=key, alg="HS512", settings=s),
        "wrong key": _forge(key="x" * 40, settings=s),
        "expired": _forge(
            {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200, "nbf": int(time.time()) - 7200}, key=key, settings=s
        ),
        "wrong aud": _forge({"aud": "someone-else"}, key=key, settings=s),
        "wrong iss": _forge({"iss": "evil"}, key=key, settings=s),
        "refresh as access": _forge({"typ": "refresh"}, key=key, settings=s),
        "garbage": "not.a.token",
    }
    for name, token in attacks.items():
        r = client.simulate_get("/api/users", headers=bearer(token))
        assert r.status_code == 401, (name, r.text)
        assert r.json["error"]["code"] in ("invalid_token", "token_expired"), name
    assert client.simulate_get("/api/users", headers=bearer(admin_token)).status_code == 200
    client.simulate_post("/auth/logout", headers=bearer(admin_token))
    r = client.simulate_get("/api/users", headers=bearer(admin_token))
    _envelope_error(r, 401, "token_revoked")


def test_user_on_admin_route_is_403(client):
    token = user_token(client, "plainuser")
    _envelope_error(client.simulate_get("/api/users", headers=bearer(token)), 403, "forbidden")
    _envelope_error(client.simulate_get("/api/metrics", headers=bearer(token)), 403, "forbidden")
    _envelope_error(client.simulate_patch("/api/users/1", json={"role": "admin"}, headers=bearer(token)), 403, "forbidden")
    _envelope_error(client.simulate_get("/api/users"), 401, "unauthorized")


def test_identity_header_signed_by_balancer_is_trusted_and_forged_is_401(client, db_config):
    user = register(client, "viaproxy")
    claims = {"sub": str(user["id"]), "usr": "viaproxy", "role": "user", "jti": "j1", "fam": "f1", "gen": 0, "exp": time.time() + 60}
    good = identity.sign(claims, identity.key_bytes(db_config.secrets.identity_key))
    r = client.simulate_get("/api/protected", headers={identity.HEADER: good})
    assert r.status_code == 200 and r.json["data"]["user"]["username"] == "viaproxy"
    forged = identity.sign({**claims, "role": "admin"}, b"not-the-key" * 4)
    _envelope_error(client.simulate_get("/api/protected", headers={identity.HEADER: forged}), 401, "invalid_identity")
    _envelope_error(client.simulate_get("/api/status", headers={identity.HEADER: "v1.junk.junk"}), 401, "invalid_identity")
    stale = identity.sign(claims, identity.key_bytes(db_config.secrets.identity_key), now=time.time() - 3600)
    _envelope_error(client.simulate_get("/api/protected", headers={identity.HEADER: stale}), 401, "invalid_identity")


def test_bad_bearer_on_public_route_is_ignored(client):
    assert client.simulate_get("/api/status", headers=bearer("garbage")).status_code == 200
    assert client.simulate_post("/auth/login", json={"username": "a", "password": "b"}, headers=bearer("garbage")).status_code == 401


# --- OpenAPI -------------------------------------------------------------------------------


def test_openapi_covers_every_route_both_ways(client):
    from openapi_spec_validator import validate

    doc = client.simulate_get("/openapi.json").json
    validate(doc)
    app = client.app
    in_app = {(openapi.openapi_path(t), m.lower()) for t, m, _ in openapi.routes(app)}
    in_doc = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert in_app == in_doc
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert not op.get("x-undocumented"), (method, path)
            assert op["summary"] and any(code.startswith("2") for code in op["responses"]), (method, path)
            # every documented operation exists: the router finds a responder for it
            concrete = path
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    sample = "1" if param["schema"].get("type") == "integer" else "x"
                    concrete = concrete.replace("{" + param["name"] + "}", sample)
            r = client.simulate_request(method.upper(), concrete)
            assert "no route for" not in r.text and r.status_code != 405, (method, path, r.text)
    expected = {"/health/ping", "/health/status", "/health/nodes", "/auth/login", "/auth/register", "/auth/refresh", "/auth/validate"}
    expected |= {"/auth/profile", "/auth/password", "/auth/logout", "/auth/logout-all", "/auth/mfa/setup", "/auth/mfa/enable"}
    expected |= {
        "/auth/mfa/disable",
        "/api/status",
        "/api/protected",
        "/api/users",
        "/api/users/{user_id}",
        "/api/metrics",
        "/openapi.json",
    }
    assert expected <= set(doc["paths"])
    login_op = doc["paths"]["/auth/login"]["post"]
    assert login_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/LoginIn")
    assert "LoginIn" in doc["components"]["schemas"]


# --- malformed input never 5xx -----------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
_field_names = st.sampled_from(
    ["username", "password", "email", "mfa_token", "refresh_token", "full_name", "preferences", "code", "token", "role", "is_active"]
    + ["current_password", "new_password", "department", "\u0000", "\ud7ff", "名前"]
)
_bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(_field_names, _json_values, max_size=6).map(lambda d: __import__("orjson").dumps(d)),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999999", b'{"username": "\\ud800"}', b'{"username": "a\\u0000b"}', b"\xff\xfe"]),
)


def _json_endpoints(app):
    out = []
    for template, method, responder in openapi.routes(app):
        op = openapi.operation_of(responder)
        if op is not None and op.request is not None and op.request_media == "application/json":
            out.append((method, openapi.openapi_path(template).replace("{user_id}", "1")))
    return out


@pytest.mark.slow
def test_malformed_json_never_5xx(db_config, db):
    client = client_for(db_config)
    token = user_token(client, "fuzzadmin", role="admin")
    endpoints = _json_endpoints(client.app)
    assert len(endpoints) >= 8

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=_bodies, which=st.integers(min_value=0, max_value=len(endpoints) - 1), authed=st.booleans())
    def run(body, which, authed):
        method, path = endpoints[which]
        headers = {"Content-Type": "application/json", **(bearer(token) if authed else {})}
        if path == "/auth/password" or path == "/auth/logout":
            headers.pop("Authorization", None)  # keep the admin's token alive for the other examples
        r = client.simulate_request(method, path, body=body, headers=headers)
        assert r.status_code < 500, (method, path, body, r.text)
        assert r.json["status"] in ("success", "error")

    run()


def test_json_nested_past_the_bound_is_400_on_every_parser(db_config, db):
    """read_json routes and operators' routes reading req.get_media() alike: 400 json_too_deep, never 500."""
    from appliance.api.app import create_app

    app = create_app(db_config)

    class Echo:
        def on_post(self, req, resp):
            resp.media = {"got": type(req.get_media()).__name__}

    app.add_route("/echo", Echo())
    client = falcon.testing.TestClient(app)
    headers = {"Content-Type": "application/json"}
    for depth in (65, 255, 100_000):
        body = b"[" * depth + b"]" * depth
        err = _envelope_error(client.simulate_post("/echo", body=body, headers=headers), 400, "json_too_deep")
        assert err["details"] == {"limit": 64, "current": depth, "setting": "api.json_max_depth"}
        _envelope_error(client.simulate_post("/auth/login", body=b'{"username": ' + body + b"}", headers=headers), 400, "json_too_deep")
    assert client.simulate_post("/echo", body=b"[" * 64 + b"]" * 64, headers=headers).json == {"got": "list"}
    assert client.simulate_post("/echo", body=b'["' + b"[" * 500 + b'"]', headers=headers).json == {"got": "list"}
