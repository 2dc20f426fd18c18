"""TOTP second factor (RFC 6238, 30 s steps, 6 digits, ±1 step of clock skew) and recovery codes.

/auth/mfa/setup stores a fresh secret (not yet enforced) and returns it with its
otpauth:// URI; /auth/mfa/enable turns it on after one valid code and answers
with RECOVERY_CODES one-time recovery codes (shown this once, stored hashed);
/auth/mfa/disable needs the password AND a current code (TOTP or a recovery
code); /auth/mfa/recovery-codes makes a new set (password + TOTP code), voiding
the old. From then on /auth/login needs `mfa_token` (a TOTP code or a recovery
code) for the account (401 mfa_required without it).

Enabling or disabling MFA logs the user out everywhere (every token of the
user is revoked, this client's included) and the answer carries a fresh token
pair for this client, as a password change does: a session opened before the
change, by whoever had the password then, does not survive it. Wrong passwords
and codes here count toward the login lockout (appliance.logins.reconfirm).
The code logic itself is appliance.secondfactor, shared with every login surface.
"""

from __future__ import annotations

from typing import Annotated

import falcon
import msgspec
import pyotp
from msgspec import Meta

from appliance import logins, secondfactor
from appliance.api import audit, sessions
from appliance.api.context import ApiContext
from appliance.api.operations import client_address, ok, operation, require_user
from appliance.api.readers import read_json
from appliance.db.models import User, database
from appliance.errors import Conflict, Unauthorized, ValidationFailed
from appliance.times import utcnow

Code = Annotated[str, Meta(max_length=16, description="the 6-digit code of the authenticator app, or a recovery code")]
Password = Annotated[str, Meta(max_length=1024)]


class SetupOut(msgspec.Struct, kw_only=True):
    secret: str
    otpauth_uri: str
    issuer: str
    digits: int
    period: int


class CodeIn(msgspec.Struct, kw_only=True):
    code: Code | None = None
    token: Code | None = None  # accepted as an alias of code
    password: Password | None = None  # disable and recovery-codes: required with the code

    @property
    def value(self) -> str | None:
        return self.code or self.token


class MfaState(msgspec.Struct, kw_only=True, omit_defaults=True):
    mfa_enabled: bool
    message: str
    recovery_codes: list[str] | None = None  # enable: shown this once
    recovery_codes_left: int | None = None
    # enable/disable revoke every session; these are the fresh pair for this client
    access_token: str | None = None
    refresh_token: str | None = None
    token_type: str | None = None
    expires_in: int | None = None


class RecoveryCodesOut(msgspec.Struct, kw_only=True):
    recovery_codes: list[str]
    message: str


def _user(req: falcon.Request) -> User:
    who = require_user(req)
    user = User.get_or_none(User.id == who.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("the account no longer exists or is disabled", code="account_disabled")
    return user


def _reconfirm(ctx: ApiContext, req: falcon.Request, user: User, body: CodeIn, action: str, recovery_codes: bool = True) -> None:
    """400 naming the missing or wrong field unless both the password and a code are right (429 while locked)."""
    if not body.password:
        raise ValidationFailed("the password is required", field="password")
    if not body.value:
        raise ValidationFailed("a current code is required" + (" (or a recovery code)" if recovery_codes else ""), field="code")
    wrong = logins.reconfirm(
        ctx.cfg,
        user,
        client_address(req),
        password=body.password,
        code=body.value,
        audit=audit.sink(req),
        action=action,
        recovery_codes=recovery_codes,
    )
    if wrong == "password":
        raise ValidationFailed("the password is not correct", field="password", code="invalid_password")
    if wrong == "code":
        raise ValidationFailed("the code is not valid", field="code", code="invalid_mfa_token")


def _relogin(ctx: ApiContext, req: falcon.Request, user: User, reason: str) -> sessions.TokenPair:
    """Revoke every token of the user (this client's too) and start a fresh session for this client."""
    sessions.logout_all(ctx, user, req, reason=reason)
    return sessions.start(ctx, user, req)


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
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Enable TOTP after one valid code; answers with one-time recovery codes",
        request=CodeIn,
        response=MfaState,
        auth="user",
        errors=(409,),
        tags=("auth",),
        description="Every other session of the user is logged out; the answer carries a fresh token pair for this client.",
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _user(req)
        body: CodeIn = read_json(req, CodeIn)
        if user.mfa_enabled:
            raise Conflict("MFA is already enabled", code="mfa_already_enabled")
        if not user.mfa_secret:
            raise Conflict("call /auth/mfa/setup first", code="mfa_not_set_up")
        if not body.value:
            raise ValidationFailed("code is required", field="code")
        if not secondfactor.consume_code(user, body.value):
            audit.record("mfa_enable_failed", req, user_id=user.id, username=user.username)
            raise ValidationFailed("the code is not valid", field="code", code="invalid_mfa_token")
        with database.atomic():
            User.update(mfa_enabled=True, updated_at=utcnow()).where(User.id == user.id).execute()
            codes = secondfactor.new_recovery_codes(user, self.ctx.cfg.secrets.jwt_secret)
        user.mfa_enabled = True
        pair = _relogin(self.ctx, req, user, "mfa_enabled")
        audit.record("mfa_enabled", req, user_id=user.id, username=user.username)
        ok(
            resp,
            MfaState(
                mfa_enabled=True,
                message="MFA is enabled; logins now need a code. Store the recovery codes now: they are shown once",
                recovery_codes=codes,
                recovery_codes_left=len(codes),
                access_token=pair.access_token,
                refresh_token=pair.refresh_token,
                token_type="bearer",
                expires_in=pair.expires_in,
            ),
        )


class DisableResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Disable TOTP: the password and a current code (or a recovery code)",
        request=CodeIn,
        response=MfaState,
        auth="user",
        errors=(409, 429),
        tags=("auth",),
        description="Wrong passwords and codes count toward the login lockout. Every session of the user is logged out; "
        "the answer carries a fresh token pair for this client.",
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _user(req)
        body: CodeIn = read_json(req, CodeIn)
        if not user.mfa_enabled:
            raise Conflict("MFA is not enabled", code="mfa_not_enabled")
        _reconfirm(self.ctx, req, user, body, "mfa_disable")
        with database.atomic():
            User.update(mfa_enabled=False, mfa_secret=None, mfa_last_step=None, updated_at=utcnow()).where(User.id == user.id).execute()
            secondfactor.drop_recovery_codes(user)
        user.mfa_enabled, user.mfa_secret = False, None
        pair = _relogin(self.ctx, req, user, "mfa_disabled")
        audit.record("mfa_disabled", req, user_id=user.id, username=user.username)
        ok(
            resp,
            MfaState(
                mfa_enabled=False,
                message="MFA is disabled; other sessions are logged out",
                access_token=pair.access_token,
                refresh_token=pair.refresh_token,
                token_type="bearer",
                expires_in=pair.expires_in,
            ),
        )


class RecoveryCodesResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Make a new set of recovery codes (the old ones stop working): the password and a current TOTP code",
        request=CodeIn,
        response=RecoveryCodesOut,
        auth="user",
        errors=(409, 429),
        tags=("auth",),
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _user(req)
        body: CodeIn = read_json(req, CodeIn)
        if not user.mfa_enabled:
            raise Conflict("MFA is not enabled", code="mfa_not_enabled")
        _reconfirm(self.ctx, req, user, body, "mfa_recovery_codes", recovery_codes=False)
        codes = secondfactor.new_recovery_codes(user, self.ctx.cfg.secrets.jwt_secret)
        audit.record("mfa_recovery_codes_regenerated", req, user_id=user.id, username=user.username)
        ok(resp, RecoveryCodesOut(recovery_codes=codes, message="new recovery codes; the old ones no longer work. They are shown once"))


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/auth/mfa/setup", SetupResource(ctx))
    app.add_route("/auth/mfa/enable", EnableResource(ctx))
    app.add_route("/auth/mfa/disable", DisableResource(ctx))
    app.add_route("/auth/mfa/recovery-codes", RecoveryCodesResource(ctx))
