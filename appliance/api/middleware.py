"""The middleware every request passes, outermost first.

1. Metrics: in-flight gauge, then per-route count and latency into prometheus
   (route = the URI template, "unmatched" for 404s, so labels stay bounded).
2. RequestId: the incoming X-Request-ID when valid (1-128 of [A-Za-z0-9._-]), else
   a new one; set in appliance.logs.request_id for log lines; echoed back.
3. Identity: a request carrying X-Appliance-Identity must carry a valid one (HMAC by the
   identity key, fresh, not revoked), else 401 whatever the route. Without it the
   Authorization bearer token is verified here, lazily, when a responder asks
   (require_user): so a bad token on a public route is ignored, and a worker reached
   directly still authenticates correctly.
4. Headers: nosniff, X-Frame-Options DENY, Referrer-Policy, no-store on /auth/*;
   gzip of bodies over [api] gzip_min_bytes when the client accepts it.
5. Database: pooled PostgreSQL connections go back to the pool after each request.
"""

from __future__ import annotations

import gzip
import logging
import re
import threading
import time
import uuid
from typing import Any

import falcon
import orjson
from playhouse.pool import PooledDatabase

from appliance import identity, jsondepth, tokens
from appliance.api import instruments
from appliance.api.context import ApiContext, Identity
from appliance.db.models import User
from appliance.errors import Unauthorized
from appliance.logs import request_id
from appliance.times import utcnow

log = logging.getLogger(__name__)

_RID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ACTIVITY_EVERY = 60.0  # seconds between last_activity writes per user and worker


class MetricsMiddleware:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self.inst: dict[str, Any] = {}  # made at the first request: never in the template (app.prebuild), whose pid would own the files
        # The labelled children, found once per label set: labels() validates and locks on every call,
        # a tenth of a ping's cost in the worker. Bounded like the children themselves (route templates).
        self._counts: dict[tuple[str, str, str], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        self.ctx.enter()
        if not self.inst:
            self.inst = instruments.get()
        self.inst["inflight"].inc()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        started = getattr(req.context, "started", None)
        if started is None:
            return
        self.ctx.leave()
        self.inst["inflight"].dec()
        route = req.uri_template if resource is not None and req.uri_template else "unmatched"
        status = resp.status_code if hasattr(resp, "status_code") else int(str(resp.status).split()[0])
        key = (req.method, route, str(status))
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.inst["requests"].labels(*key)
        count.inc()
        latency = self._latencies.get(key[:2])
        if latency is None:
            latency = self._latencies[key[:2]] = self.inst["latency"].labels(*key[:2])
        latency.observe(time.perf_counter() - started)


class RequestIdMiddleware:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        incoming = req.get_header("X-Request-ID")
        rid = incoming if incoming and _RID_RE.match(incoming) else uuid.uuid4().hex
        req.context.request_id = rid
        req.context.rid_token = request_id.set(rid)
        req.context.max_body_bytes = self.ctx.cfg.api.max_body_bytes
        req.context.json_max_depth = self.ctx.cfg.api.json_max_depth
        req.context.ctx = self.ctx
        resp.context.check_responses = self.ctx.check_responses
        resp.set_header("X-Request-ID", rid)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        token = getattr(req.context, "rid_token", None)
        if token is not None:
            request_id.reset(token)


class IdentityMiddleware:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self._seen: dict[int, float] = {}
        self._seen_lock = threading.Lock()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        state: dict[str, Any] = {}
        signed = req.get_header(identity.HEADER)
        if signed is not None:
            try:
                claims = identity.verify(signed, self.ctx.identity_key)
                who = Identity.from_claims(claims, "balancer")
            except (identity.IdentityError, KeyError, TypeError, ValueError):
                instruments.auth_event("forged_identity")
                raise Unauthorized("the identity header is not valid", code="invalid_identity") from None
            if who.expires and who.expires < time.time() - self.ctx.tokens.leeway:
                raise Unauthorized("token has expired", code="token_expired")
            self._check_revoked(who.claims())
            state["who"] = who

        def resolve() -> Identity | None:
            if "who" not in state:
                state["who"] = self._from_bearer(req)
            return state["who"]

        req.context.resolve_identity = resolve
        req.context.identity_state = state

    def _check_revoked(self, claims: dict[str, Any]) -> None:
        if self.ctx.revoked(claims):
            instruments.auth_event("revoked_token")
            raise Unauthorized("token has been revoked", code="token_revoked")

    def _from_bearer(self, req: falcon.Request) -> Identity | None:
        token = tokens.bearer(req.get_header("Authorization"))
        if token is None:
            return None
        try:
            claims = tokens.verify(self.ctx.tokens, token)
        except tokens.TokenError:
            instruments.auth_event("invalid_token")
            raise
        self._check_revoked(claims)
        return Identity.from_claims(claims, "token")

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        state = getattr(req.context, "identity_state", None)
        who = state.get("who") if state else None
        if who is None:
            return
        now = time.monotonic()
        with self._seen_lock:
            if now - self._seen.get(who.user_id, -_ACTIVITY_EVERY) < _ACTIVITY_EVERY:
                return
            self._seen[who.user_id] = now
        try:  # active users for /api/metrics; never fails the request
            User.update(last_activity=utcnow()).where(User.id == who.user_id).execute()
        except Exception as exc:
            log.debug("last_activity not recorded: %s", exc)


class HeadersMiddleware:
    def __init__(self, ctx: ApiContext):
        self.gzip_min = ctx.cfg.api.gzip_min_bytes

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("X-Frame-Options", "DENY")
        resp.set_header("Referrer-Policy", "no-referrer")
        if req.path.startswith("/auth/"):
            resp.set_header("Cache-Control", "no-store")
            resp.set_header("Pragma", "no-cache")
        data = resp.data
        if self.gzip_min and data and len(data) > self.gzip_min and resp.get_header("Content-Encoding") is None:
            accepted = (req.get_header("Accept-Encoding") or "").lower()
            if "gzip" in accepted and "gzip;q=0" not in accepted.replace(" ", ""):
                resp.data = gzip.compress(data, compresslevel=5)
                resp.set_header("Content-Encoding", "gzip")
                resp.append_header("Vary", "Accept-Encoding")


class DatabaseMiddleware:
    """Return pooled connections after each request (SQLite keeps one per thread)."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx  # its db is read per request: an app built in the template gets it at ctx.bind

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        db = self.ctx.db
        if isinstance(db, PooledDatabase) and not db.is_closed():
            try:
                db.close()
            except Exception as exc:  # a broken connection is dropped by the pool
                log.debug("closing pooled connection failed: %s", exc)


def json_media(max_depth: int) -> falcon.media.JSONHandler:
    """The JSON media handler of req.get_media() (operators' routes): depth-checked like read_json, parsed by orjson."""

    def loads(text: str) -> Any:
        jsondepth.check(text, max_depth)
        return orjson.loads(text)

    return falcon.media.JSONHandler(loads=loads)


def stack(ctx: ApiContext) -> list[Any]:
    """The middleware list, outermost first."""
    return [MetricsMiddleware(ctx), RequestIdMiddleware(ctx), HeadersMiddleware(ctx), DatabaseMiddleware(ctx), IdentityMiddleware(ctx)]
