"""/auth/*: register, login, refresh, validate, profile, password, logout, logout-all.

Login is decided by appliance.logins.authenticate (lockout with 429 +
Retry-After, one 401 invalid_credentials for an unknown user, a wrong password
and a disabled account alike, equal timing, MFA, audit); this module only turns
its User into a token pair. A wrong current password on /auth/password counts
toward the same lockout. bcrypt runs in the waitress thread of the request: it
releases the GIL, so the worker's other threads keep serving.
"""

from __future__ import annotations

from typing import Annotated, Any

import falcon
import msgspec
import orjson
import peewee as pw
from msgspec import Meta

from appliance import accounts, logins, tokens
from appliance.api import audit, sessions
from appliance.api.context import ApiContext
from appliance.api.operations import client_address, ok, operation, require_user
from appliance.api.readers import read_json
from appliance.api.schemas import Message, UserEnvelope, UserOut, user_out
from appliance.db.models import Task, User
from appliance.errors import AppError, Forbidden, Unauthorized, ValidationFailed
from appliance.times import from_timestamp, iso, utcnow

Name = Annotated[str, Meta(max_length=254, description="user name (or email address at login)")]
Secret = Annotated[str, Meta(max_length=1024)]
Text = Annotated[str, Meta(max_length=200)]
# the rules accounts.validate_username / validate_email apply, stated in the schema
NewName = Annotated[str, Meta(pattern=accounts.USERNAME_RE.pattern, description="3-64 letters, digits, '.', '_' or '-'")]
Email = Annotated[str, Meta(max_length=254, pattern=accounts.EMAIL_RE.pattern)]

PERMISSIONS = {"admin": ["read", "write", "tasks", "admin"], "user": ["read", "write", "tasks"]}


class RegisterIn(msgspec.Struct, kw_only=True):
    username: NewName
    email: Email
    password: Secret
    full_name: Text = ""


class LoginIn(msgspec.Struct, kw_only=True):
    username: Name
    password: Secret
    mfa_token: Annotated[str, Meta(max_length=16)] | None = None


class RefreshIn(msgspec.Struct, kw_only=True):
    refresh_token: Annotated[str, Meta(max_length=8192)] | None = None


class ValidateOut(msgspec.Struct, kw_only=True):
    valid: bool
    user_id: int
    username: str
    role: str
    expires_at: str | None
    source: str


class Statistics(msgspec.Struct, kw_only=True):
    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    last_activity: str | None


class ProfileUser(UserOut, kw_only=True):
    permissions: list[str]
    updated_at: str | None


class Profile(msgspec.Struct, kw_only=True):
    user: ProfileUser
    preferences: dict[str, Any]
    statistics: Statistics


class ProfileIn(msgspec.Struct, kw_only=True):
    full_name: Text | None = None
    email: Email | None = None
    department: Text | None = None
    preferences: dict[str, Any] | None = None


class PasswordIn(msgspec.Struct, kw_only=True):
    current_password: Secret
    new_password: Secret


class PasswordOut(msgspec.Struct, kw_only=True):
    message: str
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int


def _active_user(user_id: int) -> User:
    user = User.get_or_none(User.id == user_id)
    if user is None or not user.is_active:
        raise Unauthorized("the account no longer exists or is disabled", code="account_disabled")
    return user


class RegisterResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Create a user account",
        request=RegisterIn,
        response=UserEnvelope,
        errors=(403, 409),
        tags=("auth",),
        rules=(
            (
                "password",
                "weak_password",
                "the password has at least [auth] min_password_length characters, is not the user name, "
                "has two of lower case, upper case, digits, symbols (or 16+ characters) and 4+ distinct characters",
            ),
        ),
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        a = self.ctx.cfg.auth
        if not a.allow_registration:
            raise Forbidden("registration is disabled on this appliance", code="registration_disabled")
        body: RegisterIn = read_json(req, RegisterIn)
        user = accounts.create_user(
            body.username, body.email, body.password, rounds=a.bcrypt_rounds, min_length=a.min_password_length, full_name=body.full_name
        )
        audit.record("user_registered", req, user_id=user.id, username=user.username)
        ok(resp, UserEnvelope(user=user_out(user)))


class LoginResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Log in: an access token and a refresh token",
        request=LoginIn,
        response=sessions.TokenPair,
        errors=(401, 429),
        tags=("auth",),
        description=(
            "The user name matches in any case (names are unique ignoring case), or give the email address. "
            "401 invalid_credentials for an unknown user, a wrong password or a disabled account alike; "
            "401 mfa_required when a code is needed (mfa_token: the TOTP code or a recovery code); "
            "429 account_locked with Retry-After after too many failures for the account or the client address."
        ),
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body: LoginIn = read_json(req, LoginIn)
        user = logins.authenticate(self.ctx.cfg, body.username, body.password, body.mfa_token, client_address(req), audit=audit.sink(req))
        ok(resp, sessions.start(self.ctx, user, req))


class RefreshResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Swap a refresh token for a new pair (rotation)",
        request=RefreshIn,
        response=sessions.TokenPair,
        errors=(401,),
        tags=("auth",),
        description="The refresh token comes as Bearer or as {refresh_token}. Reusing a spent one revokes its whole family (401 token_reused).",
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body: RefreshIn = read_json(req, RefreshIn)
        token = body.refresh_token or tokens.bearer(req.get_header("Authorization"))
        if not token:
            raise Unauthorized("a refresh token is required (Bearer or refresh_token)", code="unauthorized")
        ok(resp, sessions.rotate(self.ctx, token, req))


class ValidateResource:
    @operation("Check the Bearer access token (nginx auth_request compatible)", response=ValidateOut, auth="user", tags=("auth",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        who = require_user(req)
        resp.set_header("X-User-Id", str(who.user_id))
        resp.set_header("X-User-Name", who.username)
        resp.set_header("X-User-Role", who.role)
        expires = iso(from_timestamp(who.expires)) if who.expires else None
        ok(resp, ValidateOut(valid=True, user_id=who.user_id, username=who.username, role=who.role, expires_at=expires, source=who.source))


def _profile(user: User) -> Profile:
    counts = dict(Task.select(Task.status, pw.fn.COUNT(Task.id)).where(Task.owner == user.id).group_by(Task.status).tuples())
    stats = Statistics(
        tasks_submitted=sum(counts.values()),
        tasks_completed=counts.get("succeeded", 0),
        tasks_failed=counts.get("failed", 0),
        last_activity=iso(user.last_activity),
    )
    base = msgspec.structs.asdict(user_out(user))
    profile_user = ProfileUser(**base, permissions=PERMISSIONS.get(user.role, []), updated_at=iso(user.updated_at))
    prefs = user.preferences if isinstance(user.preferences, dict) else {}
    return Profile(user=profile_user, preferences=prefs, statistics=stats)


def _check_preferences(prefs: dict[str, Any]) -> None:
    if len(prefs) > 50:
        raise ValidationFailed("preferences may hold at most 50 keys", field="preferences")
    for key in prefs:
        if not key or len(key) > 64:
            raise ValidationFailed("preference names must be 1-64 characters", field="preferences")
    if len(orjson.dumps(prefs)) > 8192:
        raise ValidationFailed("preferences may take at most 8 KB", field="preferences")


class ProfileResource:
    @operation("The caller's profile, preferences and task statistics", response=Profile, auth="user", tags=("auth",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ok(resp, _profile(_active_user(require_user(req).user_id)))

    @operation(
        "Update full_name, email, department, preferences",
        request=ProfileIn,
        response=Profile,
        auth="user",
        errors=(409,),
        tags=("auth",),
        rules=(
            (
                "preferences",
                "validation_error",
                "at most 50 preferences with names of 1-64 characters, 8 KB in all, with those stored before",
            ),
        ),
    )
    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _active_user(require_user(req).user_id)
        body: ProfileIn = read_json(req, ProfileIn)
        changes: dict[Any, Any] = {}
        if body.full_name is not None:
            changes[User.full_name] = body.full_name.strip()
        if body.department is not None:
            changes[User.department] = body.department.strip()
        if body.email is not None:
            email = accounts.validate_email(body.email)
            if email != user.email and User.select().where((User.email == email) & (User.id != user.id)).exists():
                raise AppError("email is already registered", code="email_taken", status=409, details={"field": "email"})
            changes[User.email] = email
        if body.preferences is not None:
            _check_preferences(body.preferences)
            merged = {**(user.preferences or {}), **body.preferences}
            _check_preferences(merged)
            changes[User.preferences] = merged
        if changes:
            changes[User.updated_at] = utcnow()
            User.update(changes).where(User.id == user.id).execute()
            audit.record("profile_updated", req, user_id=user.id, username=user.username, fields=sorted(f.name for f in changes))
        ok(resp, _profile(_active_user(user.id)))


class PasswordResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Change the password; every other token of the user is revoked",
        request=PasswordIn,
        response=PasswordOut,
        auth="user",
        errors=(429,),
        tags=("auth",),
        description="The answer carries a fresh token pair for this client. A wrong current password counts toward the login lockout.",
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _active_user(require_user(req).user_id)
        body: PasswordIn = read_json(req, PasswordIn)
        wrong = logins.reconfirm(
            self.ctx.cfg, user, client_address(req), password=body.current_password, audit=audit.sink(req), action="password_change"
        )
        if wrong:
            raise ValidationFailed("the current password is not correct", field="current_password", code="invalid_password")
        a = self.ctx.cfg.auth
        accounts.set_password(user, body.new_password, rounds=a.bcrypt_rounds, min_length=a.min_password_length)
        sessions.logout_all(self.ctx, user, req, reason="password_changed", bump=False)  # set_password bumped it
        audit.record("password_changed", req, user_id=user.id, username=user.username)
        pair = sessions.start(self.ctx, _active_user(user.id), req)
        ok(
            resp,
            PasswordOut(
                message="password changed; other sessions are logged out",
                access_token=pair.access_token,
                refresh_token=pair.refresh_token,
                token_type="bearer",
                expires_in=pair.expires_in,
            ),
        )


class LogoutResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Revoke the presented access token and its refresh family", response=Message, auth="user", tags=("auth",))
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        sessions.logout(self.ctx, require_user(req), req)
        ok(resp, Message(message="logged out"))


class LogoutAllResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Revoke every token of the user on every device", response=Message, auth="user", tags=("auth",))
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        who = require_user(req)
        user = _active_user(who.user_id)
        sessions.logout_all(self.ctx, user, req)
        audit.record("logout_all", req, user_id=user.id, username=user.username)
        ok(resp, Message(message="every session of this user is logged out"))


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/auth/register", RegisterResource(ctx))
    app.add_route("/auth/login", LoginResource(ctx))
    app.add_route("/auth/refresh", RefreshResource(ctx))
    app.add_route("/auth/validate", ValidateResource())
    app.add_route("/auth/profile", ProfileResource())
    app.add_route("/auth/password", PasswordResource(ctx))
    app.add_route("/auth/logout", LogoutResource(ctx))
    app.add_route("/auth/logout-all", LogoutAllResource(ctx))
