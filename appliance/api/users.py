"""/api/status (public), /api/protected (any user), /api/users and /api/users/{id} (admin, or self to read).

An admin cannot change their own role or disable themselves (409), so an
appliance never loses its last admin by accident; disabling a user revokes
every token they hold, and so does a role change (accounts.set_active / set_role bump their token generation).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import falcon
import msgspec
from msgspec import Meta

from appliance import __version__, accounts
from appliance.api import audit
from appliance.api.context import ApiContext
from appliance.api.operations import Page, ok, operation, paginate, require_user
from appliance.api.profilecache import ProfileCache
from appliance.api.readers import read_json, read_query
from appliance.api.schemas import UserEnvelope, UserOut, user_out
from appliance.db.models import User
from appliance.errors import Conflict, Forbidden, NotFound, Unauthorized
from appliance.times import now_iso


class ServiceStatus(msgspec.Struct, kw_only=True):
    service: str
    version: str
    node_id: str
    uptime: float
    timestamp: str
    status: str


class ProtectedOut(msgspec.Struct, kw_only=True):
    user: UserOut
    message: str


class UsersQuery(Page, kw_only=True):
    role: Literal["admin", "user"] | None = None
    is_active: bool | None = None
    search: Annotated[str, Meta(max_length=100, description="part of the user name or email")] | None = None


class UserPatch(msgspec.Struct, kw_only=True):
    role: Literal["admin", "user"] | None = None
    is_active: bool | None = None


class StatusResource:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Service name, version, answering node and uptime", response=ServiceStatus, tags=("api",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ok(
            resp,
            ServiceStatus(
                service="appliance",
                version=__version__,
                node_id=self.ctx.node_id,
                uptime=round(time.time() - self.ctx.started, 1),
                timestamp=now_iso(),
                status="running",
            ),
        )


class ProtectedResource:
    """The caller's own public view; the answer is kept for a second per (user, token generation) (profilecache)."""

    def __init__(self, cache: ProfileCache | None = None):
        self.cache = cache or ProfileCache()

    @operation("A resource any logged-in user may read", response=ProtectedOut, auth="user", tags=("api",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        who = require_user(req)
        key = (who.user_id, who.generation)
        out = self.cache.get(key)
        if out is None:
            user = User.get_or_none(User.id == who.user_id)
            if user is None or not user.is_active:
                raise Unauthorized("the account no longer exists", code="account_disabled")
            if user.token_generation != who.generation:  # bumped since the token was issued: revoked, whatever the mirror knows yet
                raise Unauthorized("token has been revoked", code="token_revoked")
            out = ProtectedOut(user=user_out(user), message=f"Hello {user.username}, this is a protected resource")
            self.cache.put(key, out)
        ok(resp, out)


class UsersResource:
    @operation("Every user, paginated (admin)", query=UsersQuery, response=list[UserOut], auth="admin", paginated=True, tags=("users",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        q: UsersQuery = read_query(req, UsersQuery)
        query = User.select().order_by(User.id)
        if q.role is not None:
            query = query.where(User.role == q.role)
        if q.is_active is not None:
            query = query.where(User.is_active == q.is_active)
        if q.search:
            needle = q.search.replace("\x00", "")
            query = query.where(User.username.contains(needle) | User.email.contains(needle))
        rows, meta = paginate(query, q)
        ok(resp, [user_out(u) for u in rows], metadata=meta)


class UserResource:
    @operation("One user (admin, or the user themself)", response=UserEnvelope, auth="user", errors=(403, 404), tags=("users",))
    def on_get(self, req: falcon.Request, resp: falcon.Response, user_id: int) -> None:
        who = require_user(req)
        if not who.is_admin and who.user_id != user_id:
            raise Forbidden("you may only read your own account")
        user = User.get_or_none(User.id == user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}", code="user_not_found")
        ok(resp, UserEnvelope(user=user_out(user)))

    @operation(
        "Change a user's role or active flag (admin)",
        request=UserPatch,
        response=UserEnvelope,
        auth="admin",
        errors=(404, 409),
        tags=("users",),
    )
    def on_patch(self, req: falcon.Request, resp: falcon.Response, user_id: int) -> None:
        who = require_user(req)
        body: UserPatch = read_json(req, UserPatch)
        user = User.get_or_none(User.id == user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}", code="user_not_found")
        if user.id == who.user_id and ((body.role not in (None, user.role)) or body.is_active is False):
            raise Conflict("you cannot change your own role or disable yourself", code="cannot_modify_self")
        if body.role is not None and body.role != user.role:
            accounts.set_role(user, body.role)  # revokes the user's tokens: they carry the old role
            req.context.ctx.revocations_changed()
        if body.is_active is not None and body.is_active != user.is_active:
            accounts.set_active(user, body.is_active)
            req.context.ctx.revocations_changed()
        audit.record("user_updated", req, user_id=user.id, username=user.username, by=who.user_id, role=body.role, is_active=body.is_active)
        ok(resp, UserEnvelope(user=user_out(User.get_by_id(user.id))))


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/api/status", StatusResource(ctx))
    app.add_route("/api/protected", ProtectedResource())
    app.add_route("/api/users", UsersResource())
    app.add_route("/api/users/{user_id:int}", UserResource())
