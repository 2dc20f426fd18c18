"""The login decision, for every login surface (POST /auth/login, the status page, ...).

`authenticate()` decides; the surface only turns the User into a session (or
LoginRefused into its answer). In order:
1. the account or the client address is locked: 429 account_locked with
   retry_after, before the password is even checked;
2. the password is checked against the user's hash, or a dummy hash of the
   configured cost when there is no such user, so both take the same time;
3. unknown user, wrong password and disabled account all answer the same 401
   invalid_credentials with the same message (no oracle for any of them, not
   even through the lockout: each counts as a failure, per account and per
   address); the audit record names the real reason;
4. MFA accounts: no code gives 401 mfa_required; a wrong one 401
   invalid_mfa_token (counted); a current TOTP code or an unused recovery code
   passes (and is spent);
5. success clears the account's failure counter and counts the login.

`reconfirm()` is the same guard for a logged-in user proving again who they
are (password change, MFA changes): locked answers 429, and every wrong
password or code counts toward the same lockout as a failed login.

Audit records go to `audit(event, *, user_id=None, username=None, **details)`;
the default writes AuditEvent rows with the client address. The API passes a
sink that also fills in the request id and bumps its metrics.
"""

from __future__ import annotations

import datetime as _dt
import logging
import secrets
import threading
import time
from typing import Any, Protocol

from appliance import accounts, passwords, secondfactor
from appliance.db.models import AuditEvent, User
from appliance.errors import AppError
from appliance.throttle import LoginGuard
from appliance.times import from_timestamp, utcnow

log = logging.getLogger(__name__)

BAD_LOGIN = "invalid username or password"


class AuditSink(Protocol):
    def __call__(self, event: str, *, user_id: int | None = None, username: str | None = None, **details: Any) -> None: ...


class LoginRefused(AppError):
    """A login (or a re-confirmation) refused: code, message, HTTP status and, when locked, retry_after seconds."""

    def __init__(self, code: str, message: str, status: int, retry_after: int | None = None):
        headers: dict[str, str] = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
        if retry_after is not None:
            retry_after = max(1, int(retry_after))
            headers["Retry-After"] = str(retry_after)
        super().__init__(message, code=code, status=status, headers=headers)
        self.retry_after = retry_after


def database_audit(address: str, request_id: str | None = None) -> AuditSink:
    """The default sink: one AuditEvent row (and a log line) per event; a storage error is logged, never raised."""
    from appliance.logs import fields

    def record(event: str, *, user_id: int | None = None, username: str | None = None, **details: Any) -> None:
        name = username[:64] if isinstance(username, str) else None
        log.info("audit %s", event, extra=fields(audit=event, user_id=user_id, username=name, address=address, **details))
        try:
            AuditEvent.create(event=event, user_id=user_id, username=name, address=address or None, request_id=request_id, details=details)
        except Exception as exc:
            log.warning("audit event %s not stored: %s", event, str(exc)[:200])

    return record


def guard(cfg: Any) -> LoginGuard:
    """The lockout guard of this config (its state lives in the database, shared by every process)."""
    a = cfg.auth
    return LoginGuard(a.login_max_failures, a.login_address_max_failures, a.login_lockout_seconds)


_dummy: dict[int, str] = {}
_dummy_lock = threading.Lock()


def dummy_hash(rounds: int) -> str:
    """A bcrypt hash of cost `rounds` that no password matches: unknown users cost as much as known ones."""
    if rounds not in _dummy:
        with _dummy_lock:
            if rounds not in _dummy:
                _dummy[rounds] = passwords.hash_password(secrets.token_hex(16), rounds)
    return _dummy[rounds]


def _clock(now: float | None) -> tuple[float, _dt.datetime]:
    t = time.time() if now is None else now
    return t, from_timestamp(t)


def _refuse_if_locked(g: LoginGuard, name: str, address: str, at: _dt.datetime, audit: AuditSink, event: str, user: User | None) -> None:
    wait = g.retry_after(name, address, now=at)
    if wait > 0:
        audit(event, user_id=user.id if user else None, username=name)
        raise LoginRefused("account_locked", "too many failed attempts; try again later", 429, retry_after=wait)


def _count_failure(
    g: LoginGuard, name: str, address: str, at: _dt.datetime, audit: AuditSink, event: str, user: User | None, reason: str
) -> None:
    locked = g.failure(name, address, now=at)
    uid = user.id if user else None
    audit(event, user_id=uid, username=name, reason=reason)
    for scope in locked:
        audit("login_lockout", user_id=uid, username=name, scope=scope)


def authenticate(
    cfg: Any,
    username: str,
    password: str,
    mfa_token: str | None,
    address: str,
    *,
    audit: AuditSink | None = None,
    now: float | None = None,
) -> User:
    """The user whose credentials these are, or LoginRefused (see the module docstring for the order).

    `username` may be the user name (any case) or the email address; `address`
    is the client's (lockout and audit); `now` is a unix time (tests).
    """
    audit = audit or database_audit(address)
    t, at = _clock(now)
    g = guard(cfg)
    name = username.strip()
    _refuse_if_locked(g, name, address, at, audit, "login_refused_locked", None)
    user = accounts.find_user(name) if name else None
    good = passwords.verify_password(password, user.password_hash if user else dummy_hash(cfg.auth.bcrypt_rounds))
    if user is None or not good or not user.is_active:
        reason = "unknown_user" if user is None else ("bad_password" if not good else "account_disabled")
        _count_failure(g, name, address, at, audit, "login_failed", user, reason)
        raise LoginRefused("invalid_credentials", BAD_LOGIN, 401)
    method = "password"
    if user.mfa_enabled:
        if not mfa_token:
            audit("login_mfa_required", user_id=user.id, username=user.username)
            raise LoginRefused("mfa_required", "this account needs an MFA code (mfa_token)", 401)
        method = secondfactor.consume_second_factor(user, mfa_token, cfg.secrets.jwt_secret, at=t) or ""
        if not method:
            _count_failure(g, name, address, at, audit, "login_failed", user, "bad_mfa_token")
            raise LoginRefused("invalid_mfa_token", "the MFA code is not valid", 401)
    g.success(name)
    stamp = utcnow() if now is None else at
    User.update(login_count=User.login_count + 1, last_login=stamp, last_activity=stamp).where(User.id == user.id).execute()
    user.login_count += 1
    user.last_login = stamp
    details: dict[str, Any] = {"method": method}
    if method == "recovery_code":
        details["recovery_codes_left"] = secondfactor.remaining_recovery_codes(user)
    audit("login_success", user_id=user.id, username=user.username, **details)
    return user


def reconfirm(
    cfg: Any,
    user: User,
    address: str,
    *,
    password: str | None = None,
    code: str | None = None,
    audit: AuditSink | None = None,
    action: str = "reconfirm",
    recovery_codes: bool = True,
    now: float | None = None,
) -> str | None:
    """Check what a logged-in user presents again: None when all of it is right, else "password" or "code".

    The password is checked first (a recovery code is not spent on a wrong
    password); `code` may be a TOTP code or a recovery code (only a TOTP code
    with recovery_codes=False) and is spent when right. Raises LoginRefused 429
    while the account or address is locked; each wrong answer counts toward
    that lockout and is audited as `<action>_failed`.
    """
    audit = audit or database_audit(address)
    t, at = _clock(now)
    g = guard(cfg)
    name = user.username
    _refuse_if_locked(g, name, address, at, audit, f"{action}_refused_locked", user)
    if password is not None and not passwords.verify_password(password, user.password_hash):
        _count_failure(g, name, address, at, audit, f"{action}_failed", user, "bad_password")
        return "password"
    if recovery_codes:
        code_ok = code is None or secondfactor.consume_second_factor(user, code, cfg.secrets.jwt_secret, at=t) is not None
    else:
        code_ok = code is None or secondfactor.consume_code(user, code, at=t)
    if not code_ok:
        _count_failure(g, name, address, at, audit, f"{action}_failed", user, "bad_mfa_token")
        return "code"
    return None
