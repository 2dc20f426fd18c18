"""The status site as a WSGI app in process: what it answers when the database cannot be reached."""

from __future__ import annotations

import io
import urllib.parse
from typing import Any

import peewee as pw

from appliance.db.models import database
from appliance.monitor.history import History
from appliance.monitor.web import StatusSite


class _Sampler:
    """The part of the sampler the site reads: the latest sample and the history."""

    interval = 2.0

    def __init__(self) -> None:
        self.history = History(3600, 2.0)
        self.history.add({"t": 1.0, "rps": 0.0})

    def latest(self) -> dict[str, Any]:
        return {"t": 1.0, "database": {"reachable": False, "error": "OperationalError: unable to open database file"}}


def _call(site: StatusSite, method: str, path: str, cookie: str = "", form: dict | None = None) -> tuple[str, list, bytes]:
    body = urllib.parse.urlencode(form).encode() if form is not None else b""
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "HTTP_HOST": "127.0.0.1:8080",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_COOKIE": cookie,
        "CONTENT_TYPE": "application/x-www-form-urlencoded" if form is not None else "",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list) -> None:
        seen["status"], seen["headers"] = status, headers

    out = b"".join(site(environ, start_response))
    return seen["status"], seen["headers"], out


def test_with_the_database_down_a_live_session_still_sees_the_page_and_login_says_why(make_config, tmp_path) -> None:
    cfg = make_config()
    gone = pw.SqliteDatabase(str(tmp_path / "no-such-dir" / "appliance.db"))  # a real SQLite that cannot open its file
    before = database.obj
    database.initialize(gone)
    try:
        site = StatusSite(cfg, _Sampler(), gone)
        sid, _ = site.sessions.create(1, "root", 0)
        live = f"appliance_status={sid}"
        status, _, body = _call(site, "GET", "/status/api/snapshot", cookie=live)
        assert status.startswith("200") and b"unable to open database file" in body  # the page shows the database is down
        status, _, body = _call(site, "GET", "/status", cookie=live)
        assert status.startswith("200") and b'id="processes"' in body
        assert _call(site, "GET", "/status/api/snapshot", cookie="appliance_status=forged")[0].startswith("401")  # no session, no data
        assert _call(site, "GET", "/status/api/tasks/abc/logs", cookie=live)[0].startswith("503")
        # A login cannot be decided without the database: the form says so (503) and lets nobody in.
        _, headers, body = _call(site, "GET", "/status")
        pre = dict(headers)["Set-Cookie"].split(";")[0]
        token = body.split(b'name="csrf" value="')[1].split(b'"')[0].decode()
        status, headers, body = _call(
            site, "POST", "/status/login", cookie=pre, form={"username": "root", "password": "x" * 12, "csrf": token}
        )
        assert status.startswith("503") and b"database cannot be reached" in body
        assert not [v for k, v in headers if k == "Set-Cookie" and v.startswith("appliance_status=")]
    finally:
        database.initialize(before)
