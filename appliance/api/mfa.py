"""TOTP second factor (RFC 6238, 30 s steps, 6 digits, ±1 step of clock skew).

/auth/mfa/setup stores a fresh secret (not yet enforced) and returns it with its
otpauth:// URI; /auth/mfa/enable turns it on after one valid code;
/auth/mfa/disable turns it off given a valid code or the password. From then
on /auth/login needs `mfa_token` for the account (401 mfa_required without it).
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated

import falcon
import msgspec
import pyotp
from msgspec import Meta

from appliance import passwords
from appliance.api import audit
from appliance.api.context import ApiContext
from appliance.api.helpers import ok, operation, read_json, require_user
from appliance.db.models import User
from appliance.errors import AppError, Conflict, Unauthorized, ValidationFailed
from appliance.times import utcnow

Code = Annotated[str, Meta(max_length=16, description="the 6-digit code of the authenticator app")]


def matching_step(secret: str | None, code: str | None, at: float | None = None) -> int | None:
    """The TOTP time step (now ±1) whose code is `code`, or None."""
    if not secret or not code:
        return None
    code = code.strip().replace(" ", "")
    if not (code.isascii() and code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    now = time.time() if at is None else at
    step = int(now // totp.interval)
    found = None
    for candidate in (step - 1, step, step + 1):  # check all three: constant work whichever matches
        if hmac.compare_digest(totp.generate_otp(candidate), code):
            found = candidate
    return found


def verify_code(secret: str | None, code: str | None, at: float | None = None) -> bool:
    """True when `code` is the TOTP of `secret` for now ±1 step (no replay check: see consume_code)."""
    return matching_step(secret, code, at) is not None


def consume_code(user: User, code: str | None, at: float | None = None) -> bool:
    """True when `code` is valid now and its time step was not used before by this user.

    The step is recorded with a conditional UPDATE, so of two requests replaying
    one code at the same moment only one succeeds.
    """
    step = matching_step(user.mfa_secret, code, at)
    if step is None:
        return False
    fresh = (User.mfa_last_step.is_null()) | (User.mfa_last_step < step)
    if User.update(mfa_last_step=step).where((User.id == user.id) & fresh).execute() != 1:
        return False
    user.mfa_last_step = step
    return True


class SetupOut(msgspec.Struct, kw_only=True):
    secret: str
    otpauth_uri: str
    issuer: str
    digits: int
    period: int


class CodeIn(msgspec.Struct, kw_only=True):
    code: Code | None = None
    token: Code | None = None  # accepted as an alias of code
    password: Annotated[str, Meta(max_length=1024)] | None = None  # disable only: instead of a code

    @property
    def value(self) -> str | None:
        return self.code or self.token


class MfaState(msgspec.Struct, kw_only=True):
    mfa_enabled: bool
    message: str


def _user(req: falcon.Request) -> User:
    who = require_user(req)
    user = User.get_or_none(User.id == who.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("the account no longer exists or is disabled", code="account_disabled")
    return user


class SetupResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Start TOTP setup: a new secret and its otpauth URI", response=SetupOut, auth="user", errors=(409,), tags=("auth",))
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _user(req)
        if user.mfa_enabled:
            raise Conflict("MFA is already enabled; disable it first", code="mfa_already_enabled")
        secret = pyotp.random_base32()
        User.update(mfa_secret=secret, updated_at=utcnow()).where(User.id == user.id).execute()
        issuer = self.ctx.cfg.auth.mfa_issuer
        uri = pyotp.TOTP(secret).provisioning_uri(name=user.username, issuer_name=issuer)
        audit.record("mfa_setup", req, user_id=user.id, username=user.username)
        ok(resp, SetupOut(secret=secret, otpauth_uri=uri, issuer=issuer, digits=6, period=30))


class EnableResource:
    @operation("Enable TOTP after one valid code", request=CodeIn, response=MfaState, auth="user", errors=(409,), tags=("auth",))
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _user(req)
        body: CodeIn = read_json(req, CodeIn)
        if user.mfa_enabled:
            raise Conflict("MFA is already enabled", code="mfa_already_enabled")
        if not user.mfa_secret:
            raise Conflict("call /auth/mfa/setup first", code="mfa_not_set_up")
        if not body.value:
            raise ValidationFailed("code is required", field="code")
        if not consume_code(user, body.value):
            audit.record("mfa_enable_failed", req, user_id=user.id, username=user.username)
            raise ValidationFailed("the code is not valid", field="code", code="invalid_mfa_token")
        User.update(mfa_enabled=True, updated_at=utcnow()).where(User.id == user.id).execute()
        audit.record("mfa_enabled", req, user_id=user.id, username=user.username)
        ok(resp, MfaState(mfa_enabled=True, message="MFA is enabled; logins now need a code"))


class DisableResource:
    @operation("Disable TOTP (a valid code or the password)", request=CodeIn, response=MfaState, auth="user", errors=(409,), tags=("auth",))
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _user(req)
        body: CodeIn = read_json(req, CodeIn)
        if not user.mfa_enabled:
            raise Conflict("MFA is not enabled", code="mfa_not_enabled")
        if body.value:
            good = consume_code(user, body.value)
        elif body.password:
            good = passwords.verify_password(body.password, user.password_hash)
        else:
            raise ValidationFailed("a code (or the password) is required", field="code")
        if not good:
            audit.record("mfa_disable_failed", req, user_id=user.id, username=user.username)
            raise AppError("the code or password is not valid", code="invalid_mfa_token", status=400, details={"field": "code"})
        User.update(mfa_enabled=False, mfa_secret=None, updated_at=utcnow()).where(User.id == user.id).execute()
        audit.record("mfa_disabled", req, user_id=user.id, username=user.username)
        ok(resp, MfaState(mfa_enabled=False, message="MFA is disabled"))


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/auth/mfa/setup", SetupResource(ctx))
    app.add_route("/auth/mfa/enable", EnableResource())
    app.add_route("/auth/mfa/disable", DisableResource())
