"""/status through a real `appliance run`: who gets in, who gets data, and which forms are refused.

One appliance (balancer, api worker, task worker, monitor running the scheduler) serves the
whole module; each test uses its own client address (127.0.0.x) so the login
lockout and the login rate-limit zone of one test do not touch another.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
import trustme

from tests.integration.supervised import Appliance, http_json, wait_until

pytestmark = pytest.mark.slow

ADMIN, ADMIN_PW = "root", "Root-pass-123"
USER, USER_PW = "alice", "Alice-pass-123"
DATA = ["/status/api/snapshot", "/status/api/history", "/status/api/history?since=0", "/status/api/tasks/abc/logs"]
_addresses = itertools.count(10)


class Browser:
    """A minimal cookie-keeping client from one loopback source address (what a browser would send)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None):
        self.port = port
        self.tls = tls
        self.source = f"127.0.0.{next(_addresses)}"
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
        if self.tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=30, source_address=(self.source, 0), context=self.tls
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(self.source, 0))
        h = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            h["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            for name, value in resp.getheaders():
                if name.lower() == "set-cookie":
                    key, _, rest = value.partition("=")
                    val = rest.split(";")[0]
                    if "Max-Age=0" in value:
                        self.cookies.pop(key, None)
                    else:
                        self.cookies[key] = val
            return (
                resp.status,
                {k.lower(): v for k, v in resp.getheaders()} | {"set-cookie-all": resp.msg.get_all("Set-Cookie") or []},
                text,
            )
        finally:
            conn.close()

    def form_token(self) -> str:
        status, _, text = self.request("GET", "/status")
        assert status == 200
        return re.search(r'name="csrf" value="([^"]+)"', text).group(1)

    def login(self, username: str, password: str, **extra: str) -> tuple[int, dict, str]:
        return self.request("POST", "/status/login", {"username": username, "password": password, "csrf": self.form_token(), **extra})


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("status"), api_workers=1, task_workers=1, monitor=True)
    app.start()
    users = (
        (ADMIN, ADMIN_PW, True),
        (USER, USER_PW, False),
        ("demoted", "Demoted-pass-123", True),
        ("mfaadmin", "Mfa-admin-pass-123", True),
    )
    for name, pw, admin in users:
        r = app.cli("user", "create", name, *(["--admin"] if admin else []), "--password-stdin", stdin=pw + "\n")
        assert r.returncode == 0, r.stderr
    yield app
    app.stop()


def _refused_everywhere(b: Browser) -> None:
    for path in DATA:
        status, headers, text = b.request("GET", path)
        assert status == 401, (path, status, text)
        assert '"login_required"' in text and "processes" not in text
        assert headers["content-type"] == "application/json"


def test_anonymous_and_forged_cookies_get_the_form_and_no_data(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    status, headers, text = b.request("GET", "/status")
    assert status == 200 and 'action="/status/login"' in text and "processes" not in text
    assert "default-src 'none'" in headers["content-security-policy"]
    _refused_everywhere(b)
    b.cookies["appliance_status"] = "forged-" + "A" * 40
    _refused_everywhere(b)
    status, _, text = b.request("GET", "/status")
    assert status == 200 and 'id="login-form"' in text


def test_wrong_password_and_non_admins_are_refused(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    status, _, text = b.login(ADMIN, "wrong-password-1")
    assert status == 401 and "invalid username or password" in text and 'id="login-error"' in text
    assert "appliance_status" not in b.cookies
    status, _, text = b.login(USER, USER_PW)
    assert status == 403 and "for administrators" in text
    assert "appliance_status" not in b.cookies
    _refused_everywhere(b)


def test_admin_login_rotates_the_session_and_sets_strict_cookies(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    b.cookies["appliance_status"] = "fixated-by-an-attacker-" + "x" * 30
    status, headers, _ = b.login(ADMIN, ADMIN_PW)
    assert status == 303 and headers["location"] == "/status"
    session_cookie = next(c for c in headers["set-cookie-all"] if c.startswith("appliance_status="))
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/status"):
        assert flag in session_cookie
    assert "Secure" not in session_cookie  # plain HTTP here; behind TLS the cookie is Secure and __Host- named
    assert not b.cookies["appliance_status"].startswith("fixated")
    status, _, text = b.request("GET", "/status")
    assert status == 200 and 'id="processes"' in text and 'action="/status/logout"' in text
    # until the sampler's first pass has the processes in (a monitor just started has sampled nothing yet)
    snap = wait_until(lambda: (r := b.request("GET", "/status/api/snapshot"))[0] == 200 and '"role":"api"' in r[2] and r[2], timeout=20)
    assert snap and '"role":"api"' in snap and '"overview"' in snap
    rows = json.loads(snap)["data"]["processes"]["rows"]
    assert [r["jobs"] for r in rows if r["role"] == "monitor"] == [["scheduler"]] and "scheduler" not in {r["role"] for r in rows}
    lines = {x["name"]: x for x in json.loads(snap)["data"]["overview"]}
    assert lines["monitor"]["detail"].endswith("also runs the scheduler")
    assert 'id="hosts"' in text  # every host of the database's heartbeats, this one among them
    hosts = json.loads(snap)["data"]["cluster"]["hosts"]
    assert [h["this"] for h in hosts] == [True] and hosts[0]["state"] == "up" and hosts[0]["beating"] >= 5
    status, _, text = b.request("GET", "/status/api/history?since=0")
    assert status == 200 and '"points"' in text
    status, _, _ = b.request("GET", "/status/api/history?since=soon")
    assert status == 400


def test_an_admin_with_mfa_needs_the_current_code(appliance: Appliance) -> None:
    status, body = http_json(appliance.port, "POST", "/auth/login", {"username": "mfaadmin", "password": "Mfa-admin-pass-123"})
    assert status == 200, body
    token = body["data"]["access_token"]
    status, body = http_json(appliance.port, "POST", "/auth/mfa/setup", {}, token=token)
    assert status == 200, body
    totp = pyotp.TOTP(body["data"]["secret"])
    status, body = http_json(appliance.port, "POST", "/auth/mfa/enable", {"code": totp.at(time.time() - 30)}, token=token)
    assert status == 200, body
    b = Browser(appliance.port)
    status, _, text = b.login("mfaadmin", "Mfa-admin-pass-123")
    assert status == 401 and "needs an MFA code" in text and "MFA code (required)" in text
    wrong = "000000" if totp.now() != "000000" else "111111"
    status, _, text = b.login("mfaadmin", "Mfa-admin-pass-123", mfa_token=wrong)
    assert status == 401 and "MFA code is not valid" in text
    assert "appliance_status" not in b.cookies
    assert b.login("mfaadmin", "Mfa-admin-pass-123", mfa_token=totp.now())[0] == 303
    assert b.request("GET", "/status/api/snapshot")[0] == 200


def test_cross_site_and_tokenless_posts_fail(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    assert b.login(ADMIN, ADMIN_PW)[0] == 303
    page = b.request("GET", "/status")[2]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert b.request("POST", "/status/logout", {"csrf": csrf}, headers=evil)[0] == 403
    assert b.request("POST", "/status/logout", {"csrf": csrf}, headers={"Origin": "https://evil.example"})[0] == 403
    assert b.request("POST", "/status/logout", {"csrf": "guessed"})[0] == 403
    assert b.request("POST", "/status/logout", {})[0] == 403
    assert b.request("GET", "/status/api/snapshot")[0] == 200  # none of those logged the admin out
    # A cross-site login post: SameSite keeps the pre-login cookie home, so the token cannot match.
    other = Browser(appliance.port)
    token = other.form_token()
    other.cookies.clear()
    assert other.request("POST", "/status/login", {"username": ADMIN, "password": ADMIN_PW, "csrf": token})[0] == 403
    assert other.request("POST", "/status/login", {"username": ADMIN, "password": ADMIN_PW, "csrf": token}, headers=evil)[0] == 403
    assert "appliance_status" not in other.cookies
    # GET on the form endpoints and other methods on the page are refused.
    assert b.request("GET", "/status/logout")[0] == 405
    assert b.request("DELETE", "/status")[0] == 405


def test_logout_ends_the_session_on_the_server(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    assert b.login(ADMIN, ADMIN_PW)[0] == 303
    sid = b.cookies["appliance_status"]
    csrf = re.search(r'name="csrf" value="([^"]+)"', b.request("GET", "/status")[2]).group(1)
    status, headers, _ = b.request("POST", "/status/logout", {"csrf": csrf})
    assert status == 303 and headers["location"] == "/status"
    assert "appliance_status" not in b.cookies
    b.cookies["appliance_status"] = sid  # replaying the old cookie: dead on the server
    _refused_everywhere(b)


def test_a_demoted_admin_loses_the_page_at_the_next_poll(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    assert b.login("demoted", "Demoted-pass-123")[0] == 303
    assert b.request("GET", "/status/api/snapshot")[0] == 200
    r = appliance.cli("user", "set-role", "demoted", "user")
    assert r.returncode == 0, r.stderr
    _refused_everywhere(b)


def test_the_login_form_shares_the_login_rate_limit_zone(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    # A new user name each time, so no account lockout; 12 stays below the address lockout (20): any 429 is the zone's.
    answers = [b.login(f"nobody{i}", "Nobody-pass-123") for i in range(12)]
    limited = [text for status, _, text in answers if status == 429]
    assert limited and all('"rate_limited"' in text for text in limited), [a[0] for a in answers]


def test_static_assets_are_vendored_and_small(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    total = 0
    for name in ("status.css", "status.js"):
        status, headers, text = b.request("GET", f"/status/static/{name}")
        assert status == 200 and headers["x-content-type-options"] == "nosniff"
        total += len(text.encode())
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    total += len((Path(__file__).parents[2] / "appliance/monitor/static/status.html").read_bytes())
    assert total < 250 * 1024
    assert b.request("GET", "/status/static/../../config.py")[0] in (400, 404)  # the balancer refuses dot segments itself
    assert b.request("GET", "/status/static/secrets.toml")[0] == 404


def test_behind_tls_the_cookies_are_secure_and_host_bound(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    app = Appliance(tmp_path, api_workers=1, task_workers=0, monitor=True, balancer={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    cert.cert_chain_pems[0].write_to_path(app.data / "cert.pem")
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(app.data / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(app.data / "key.pem")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    app.start()
    try:
        assert app.cli("user", "create", ADMIN, "--admin", "--password-stdin", stdin=ADMIN_PW + "\n").returncode == 0
        b = Browser(app.port, tls=ctx)
        status, headers, _ = b.request("GET", "/status")
        assert status == 200
        (pre,) = headers["set-cookie-all"]
        assert pre.startswith("__Host-appliance_status_login=") and "; Secure" in pre and "Path=/;" in pre
        status, headers, _ = b.login(ADMIN, ADMIN_PW)
        assert status == 303
        session = next(c for c in headers["set-cookie-all"] if c.startswith("__Host-appliance_status="))
        for flag in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/"):
            assert flag in session
        assert b.request("GET", "/status/api/snapshot")[0] == 200
        # The same id without the __Host- prefix (what a plain-HTTP page of a sibling host could set) is not a session.
        sid = b.cookies.pop("__Host-appliance_status")
        b.cookies["appliance_status"] = sid
        assert b.request("GET", "/status/api/snapshot")[0] == 401
    finally:
        app.stop()
