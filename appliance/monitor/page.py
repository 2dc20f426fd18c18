"""The status page's HTML: the login form and the dashboard shell, and the vendored static files.

Everything the browser loads comes from appliance/monitor/static (no CDN, no
web fonts, no build step); the dashboard is status.html with the CSRF token of
the session and the user's name filled in (HTML-escaped). Answers carry a
Content-Security-Policy that allows only this origin, so even a task error
that slipped into the page unescaped could load nothing and run nothing.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

STATIC = ("status.css", "status.js")
TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]


@cache
def static_file(name: str) -> bytes:
    """The bytes of one vendored asset (names in STATIC only)."""
    return resources.files("appliance.monitor").joinpath("static", name).read_bytes()


def content_type(name: str) -> str:
    return TYPES[name[name.rindex(".") :]]


def dashboard(csrf: str, username: str) -> bytes:
    text = static_file("status.html").decode("utf-8")
    return text.replace("{{csrf}}", html.escape(csrf)).replace("{{user}}", html.escape(username)).encode("utf-8")


def login_form(token: str, error: str = "", username: str = "", mfa: bool = False) -> bytes:
    """The login form; `error` is shown above it, `mfa` asks for the TOTP code field to be filled."""
    err = f'<p class="error" id="login-error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Appliance status — log in</title>
<link rel="stylesheet" href="/status/static/status.css">
</head>
<body>
<form class="login" method="post" action="/status/login" id="login-form">
  <h1>Appliance status</h1>
  <p class="muted">Administrators only.</p>
  {err}
  <input type="hidden" name="csrf" value="{html.escape(token)}">
  <label for="username">User name or email</label>
  <input id="username" name="username" autocomplete="username" required maxlength="254" value="{html.escape(username)}">
  <label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password" required maxlength="1024">
  <label for="mfa_token">MFA code{" (required)" if mfa else " (when enabled)"}</label>
  <input id="mfa_token" name="mfa_token" inputmode="numeric" autocomplete="one-time-code" maxlength="64">
  <button type="submit" id="login-submit">Log in</button>
</form>
</body>
</html>
""".encode()
