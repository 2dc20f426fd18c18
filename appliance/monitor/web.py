"""/status: the login form, the page, its static files and its JSON data endpoints.

GET  /status                   the dashboard for a live admin session, else the login form
GET  /status/static/<file>     the vendored CSS and JS
POST /status/login             form login (appliance.logins: the API login's lockout, timing and audit)
POST /status/logout            ends the session
GET  /status/api/snapshot      the latest sample            } admin session only: anything else
GET  /status/api/history       ring-buffer points (?since=)  } is refused with 401 and no data
GET  /status/api/tasks/<id>/logs  one task's log lines (the failure list links here)

Every data answer re-reads the session's user: an account that was demoted,
disabled or logged out everywhere (its token generation moved) loses the page
at its next poll. The login form's POST path is under the balancer's login
rate-limit zone (/status/login in the default zones).
"""

from __future__ import annotations

import logging
import secrets
import urllib.parse
from typing import Any

import orjson

from appliance import identity
from appliance.db.errors import DatabaseError, translated
from appliance.errors import error_body
from appliance.monitor import page
from appliance.monitor.sessions import COOKIE, LOGIN_COOKIE, Session, Sessions, cookie, csrf_ok, read_cookie, same_site

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 8192
_JSON = [("Content-Type", "application/json"), *page.HEADERS]
_HTML = [("Content-Type", "text/html; charset=utf-8"), *page.HEADERS]


class Answer(Exception):
    """An early answer (status, headers, body) out of a handler."""

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes):
        super().__init__(status)
        self.status, self.headers, self.body = status, headers, body


def _json_error(status: str, code: str, message: str) -> Answer:
    return Answer(status, list(_JSON), error_body(code, message))


class StatusSite:
    def __init__(self, cfg: Any, sampler: Any, db: Any, sessions: Sessions | None = None):
        self.cfg = cfg
        self.sampler = sampler
        self.db = db
        self.key = identity.key_bytes(cfg.secrets.identity_key)
        self.secure = bool(cfg.balancer.tls_cert)
        self.sessions = sessions or Sessions(cfg.monitor.session_minutes * 60.0, self.key)

    # -- plumbing ---------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            status, headers, body = self._route(environ)
        except Answer as a:
            status, headers, body = a.status, a.headers, a.body
        except DatabaseError as exc:
            log.warning("status page request failed on the database: %s", exc)
            a = _json_error("503 Service Unavailable", "database_unavailable", "the database cannot be reached; try again shortly")
            status, headers, body = a.status, a.headers, a.body
        except Exception:  # a bug must answer 500 in the envelope, never take the monitor down
            log.exception("status page request failed")
            a = _json_error("500 Internal Server Error", "internal_error", "the status page failed; see the monitor log")
            status, headers, body = a.status, a.headers, a.body
        if environ.get("REQUEST_METHOD") == "HEAD":
            body = b""
        start_response(status, headers)
        return [body]

    def _route(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/status/static/"):
            self._methods(method, "GET", "HEAD")
            return self._static(path[len("/status/static/") :])
        if path in ("/status", "/status/"):
            self._methods(method, "GET", "HEAD")
            return self._index(environ)
        if path == "/status/login":
            self._methods(method, "POST")
            return self._login(environ)
        if path == "/status/logout":
            self._methods(method, "POST")
            return self._logout(environ)
        if path.startswith("/status/api/"):
            self._methods(method, "GET", "HEAD")
            session = self._admin(environ)
            if session is None:
                raise _json_error("401 Unauthorized", "login_required", "log in to /status as an administrator first")
            return self._data(path[len("/status/api/") :], environ)
        raise _json_error("404 Not Found", "not_found", f"no such path: {path[:200]}")

    @staticmethod
    def _methods(method: str, *allowed: str) -> None:
        if method not in allowed:
            allow = ", ".join(allowed)
            raise Answer(
                "405 Method Not Allowed", [*_JSON, ("Allow", allow)], error_body("method_not_allowed", f"{method} is not allowed here")
            )

    def _address(self, environ: dict[str, Any]) -> str:
        return identity.verify_client(environ.get("HTTP_X_APPLIANCE_CLIENT", ""), self.key) or environ.get("REMOTE_ADDR", "")[:64]

    def _sid(self, environ: dict[str, Any]) -> str | None:
        return read_cookie(environ, COOKIE, secure=self.secure)

    def _admin(self, environ: dict[str, Any]) -> Session | None:
        """The live session of an admin who is still an active admin with the same token generation, else None.

        With the database unreachable a live session is honoured as it stands (checked at login, bounded by its
        expiry): the page is how an admin sees that the database is down, so it must not go dark with it.
        """
        from appliance.db.models import User

        sid = self._sid(environ)
        session = self.sessions.get(sid)
        if session is None:
            return None
        try:
            with translated(), self.db.connection_context():
                user = User.get_or_none(User.id == session.user_id)
        except DatabaseError as exc:
            log.debug("session of user %s kept while the database is unreachable: %s", session.user_id, exc)
            return session
        if user is None or not user.is_active or user.role != "admin" or user.token_generation != session.generation:
            self.sessions.drop_user(session.user_id)
            return None
        return session

    # -- pages --------------------------------------------------------------------------------
    def _static(self, name: str) -> tuple[str, list[tuple[str, str]], bytes]:
        if name not in page.STATIC:
            raise _json_error("404 Not Found", "not_found", "no such file")
        headers = [("Content-Type", page.content_type(name)), *[(k, v) for k, v in page.HEADERS if k != "Cache-Control"]]
        return "200 OK", [*headers, ("Cache-Control", "no-cache")], page.static_file(name)

    def _login_page(self, status: str, error: str = "", username: str = "", mfa: bool = False, extra: list | None = None) -> Answer:
        pre = secrets.token_urlsafe(24)  # a fresh pre-login value each time the form is shown
        headers = [*_HTML, ("Set-Cookie", cookie(LOGIN_COOKIE, pre, secure=self.secure, max_age=3600)), *(extra or [])]
        return Answer(status, headers, page.login_form(self.sessions.login_token(pre), error, username, mfa))

    def _index(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        session = self._admin(environ)
        if session is None:
            raise self._login_page("200 OK")
        return "200 OK", list(_HTML), page.dashboard(session.csrf, session.username)

    def _form(self, environ: dict[str, Any]) -> dict[str, str]:
        if not same_site(environ):
            raise _json_error("403 Forbidden", "cross_site", "cross-site form posts are refused")
        ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise _json_error("415 Unsupported Media Type", "unsupported_media_type", "send the form as application/x-www-form-urlencoded")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_FORM_BYTES:
            raise _json_error("413 Content Too Large", "body_too_large", f"a form is at most {MAX_FORM_BYTES} bytes")
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            pairs = urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise _json_error("400 Bad Request", "bad_form", "the form could not be read") from None
        return {k: v[0] for k, v in pairs.items()}

    def _login(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:

        form = self._form(environ)
        if not self.sessions.login_token_ok(read_cookie(environ, LOGIN_COOKIE, secure=self.secure), form.get("csrf")):
            raise self._login_page("403 Forbidden", "The form expired; please log in again.")
        username = form.get("username", "")[:254]
        address = self._address(environ)
        try:
            user = self._authenticate(form, username, address)
        except DatabaseError as exc:
            log.warning("status page login impossible: %s", exc)
            raise self._login_page("503 Service Unavailable", "The database cannot be reached; try again shortly.", username) from None
        self.sessions.drop(self._sid(environ))  # rotation: whatever id the browser had is never the logged-in one
        sid, _ = self.sessions.create(user.id, user.username, user.token_generation)
        log.info("status page login", extra={"fields": {"user_id": user.id, "address": address}})
        return (
            "303 See Other",
            [
                *_HTML,
                ("Location", "/status"),
                ("Set-Cookie", cookie(COOKIE, sid, secure=self.secure, max_age=int(self.sessions.lifetime))),
                ("Set-Cookie", cookie(LOGIN_COOKIE, "", secure=self.secure, max_age=0)),
            ],
            b"",
        )

    def _authenticate(self, form: dict[str, str], username: str, address: str) -> Any:
        """The admin these credentials are, or an Answer with the login form and why not (appliance.logins decides)."""
        from appliance import logins

        with translated(), self.db.connection_context():
            try:
                user = logins.authenticate(self.cfg, username, form.get("password", ""), form.get("mfa_token") or None, address)
            except logins.LoginRefused as refused:
                extra = [("Retry-After", str(refused.retry_after))] if refused.retry_after else []
                status = f"{refused.status} {'Too Many Requests' if refused.status == 429 else 'Unauthorized'}"
                raise self._login_page(status, refused.message, username, refused.code == "mfa_required", extra) from None
            if user.role != "admin":
                logins.database_audit(address)("status_login_refused", user_id=user.id, username=user.username, reason="not_admin")
                raise self._login_page("403 Forbidden", "This page is for administrators; your account is not one.", username)
        return user

    def _logout(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        form = self._form(environ)
        sid = self._sid(environ)
        session = self.sessions.get(sid)
        if session is None or not csrf_ok(session, form.get("csrf")):
            raise _json_error("403 Forbidden", "csrf_failed", "this logout did not come from the status page")
        self.sessions.drop(sid)
        return "303 See Other", [*_HTML, ("Location", "/status"), ("Set-Cookie", cookie(COOKIE, "", secure=self.secure, max_age=0))], b""

    # -- data ---------------------------------------------------------------------------------
    def _data(self, name: str, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        if name == "snapshot":
            return "200 OK", list(_JSON), orjson.dumps({"status": "success", "data": self.sampler.latest()}, default=str)
        if name == "history":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            try:
                since = float(query.get("since", ["0"])[0])
            except ValueError:
                raise _json_error("400 Bad Request", "bad_parameter", "since must be a unix time") from None
            points = self.sampler.history.since(since)
            return "200 OK", list(_JSON), orjson.dumps({"status": "success", "data": {"points": points, "interval": self.sampler.interval}})
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] == "logs":
            return self._task_logs(parts[1][:40])
        raise _json_error("404 Not Found", "not_found", f"no such data: {name[:100]}")

    def _task_logs(self, task_id: str) -> tuple[str, list[tuple[str, str]], bytes]:
        from appliance.db.models import Task, TaskLog

        with translated(), self.db.connection_context():
            task = Task.get_or_none(Task.id == task_id)
            if task is None:
                raise _json_error("404 Not Found", "task_not_found", "no such task")
            lines = [
                f"{r.at:%Y-%m-%dT%H:%M:%SZ} {r.level} {r.line}"
                for r in TaskLog.select().where(TaskLog.task == task_id).order_by(TaskLog.id).limit(2000)
            ]
        text = f"task {task.id} ({task.task_type}) {task.status}\nerror: {task.error or '-'}\n\n" + "\n".join(lines) + "\n"
        return "200 OK", [("Content-Type", "text/plain; charset=utf-8"), *page.HEADERS], text.encode("utf-8", "replace")
