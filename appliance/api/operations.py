"""What a route module declares its responders with, who calls them and how they answer.

    class Things:
        @operation("Create a thing", request=ThingIn, response=ThingOut, auth="user", status=201, errors=(409,))
        def on_post(self, req, resp):
            who = require_user(req)           # the caller (auth="user" already enforced it)
            body = read_json(req, ThingIn)    # appliance.api.readers: 400 naming the field, 413, 415
            ok(resp, ThingOut(...), status=201)

`@operation` attaches an Operation (summary, request/response Structs, query
Struct, auth, status, errors) to the responder; the same object enforces
`auth` before the responder runs, drives `read_json` / `read_query` (the body and
query readers, appliance.api.readers), and is what
GET /openapi.json documents (appliance.api.openapi walks the router), so a
schema is written once. `ok()` writes the success envelope; in tests
(ApiContext.check_responses) it also checks the data against the declared
response Struct, so the document cannot drift from what is sent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import falcon
import msgspec

from appliance import identity
from appliance.api.context import Identity
from appliance.errors import Forbidden, Unauthorized, success_body


@dataclass(frozen=True)
class Operation:
    """Everything /openapi.json and the validators know about one responder."""

    summary: str
    request: Any = None  # msgspec Struct type of the JSON body
    response: Any = None  # type of `data` in the success envelope (or of the whole body when envelope=False)
    query: Any = None  # msgspec Struct type whose fields are the query parameters
    path: Any = None  # msgspec Struct type describing path parameters (documented; the responder checks them)
    auth: str | None = None  # None (public), "user" or "admin"
    status: int = 200
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    description: str = ""
    envelope: bool = True
    request_media: str = "application/json"  # e.g. "multipart/form-data" for uploads
    response_media: tuple[str, ...] = ()  # extra media types of the success response, e.g. ("text/plain",)
    paginated: bool = False  # success carries metadata {page, per_page, total}
    also: tuple[int, ...] = ()  # other statuses whose body has the success schema (e.g. 503 of /health/status)
    rules: tuple[tuple[str, str, str], ...] = ()  # (field, error code, rule) the schemas cannot state: documented, answered 400


def operation(summary: str, **spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a responder (see module docstring); `auth` is enforced before it runs."""
    op = Operation(summary=summary, **spec)
    if op.auth not in (None, "user", "admin"):
        raise ValueError(f"auth must be None, 'user' or 'admin', not {op.auth!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def responder(resource: Any, req: falcon.Request, resp: falcon.Response, **params: Any) -> Any:
            req.context.operation = op
            resp.context.operation = op
            if op.auth == "admin":
                require_admin(req)
            elif op.auth == "user":
                require_user(req)
            return fn(resource, req, resp, **params)

        responder.__operation__ = op  # type: ignore[attr-defined]
        return responder

    return decorate


def operation_of(responder: Any) -> Operation | None:
    return getattr(responder, "__operation__", None)


# --- who is calling -------------------------------------------------------------------


def current_identity(req: falcon.Request) -> Identity | None:
    """The caller or None; raises 401 when credentials were presented but are bad."""
    resolve = getattr(req.context, "resolve_identity", None)
    return resolve() if resolve is not None else None


def require_user(req: falcon.Request) -> Identity:
    """The authenticated caller, or 401."""
    who = current_identity(req)
    if who is None:
        raise Unauthorized("authentication required", code="unauthorized")
    return who


def require_admin(req: falcon.Request) -> Identity:
    """The authenticated caller when an admin: 401 without credentials, 403 for other users."""
    who = require_user(req)
    if not who.is_admin:
        raise Forbidden("this action needs the admin role")
    return who


def client_address(req: falcon.Request) -> str:
    """The client's address: the balancer's signed X-Appliance-Client, else the socket peer.

    X-Forwarded-For is never trusted here: any local process can send it. The
    signed header needs the identity key, so a request that did not come through
    the balancer is known only by its peer (lockout, audit, token families).
    """
    cached = getattr(req.context, "client_address", None)
    if cached is not None:
        return cached
    address = None
    signed = req.get_header(identity.CLIENT_HEADER)
    ctx = getattr(req.context, "ctx", None)
    if signed and ctx is not None:
        address = identity.verify_client(signed, ctx.identity_key)
    address = address or (req.remote_addr or "")[:64]
    req.context.client_address = address
    return address


# --- pagination -------------------------------------------------------------------------


class Page(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """?page=&per_page= ; subclass it to add filters."""

    page: Annotated[int, msgspec.Meta(ge=1, le=1000000, description="page number, from 1")] = 1
    per_page: Annotated[int, msgspec.Meta(ge=1, le=100, description="items per page")] = 20

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


class PageMeta(msgspec.Struct):
    page: int
    per_page: int
    total: int
    pages: int


def page_meta(page: Page, total: int) -> PageMeta:
    return PageMeta(page=page.page, per_page=page.per_page, total=total, pages=(total + page.per_page - 1) // page.per_page)


def paginate(query: Any, page: Page) -> tuple[list[Any], PageMeta]:
    """(rows of this page, metadata) for a peewee query."""
    total = query.count()
    rows = list(query.paginate(page.page, page.per_page))
    return rows, page_meta(page, total)


# --- responses ---------------------------------------------------------------------------


def _check(resp: falcon.Response, data: Any) -> None:
    op: Operation | None = getattr(resp.context, "operation", None)
    if op is None or op.response is None:
        return
    try:
        msgspec.convert(msgspec.to_builtins(data), op.response)
    except msgspec.ValidationError as exc:
        raise AssertionError(f"response of {op.summary!r} breaks its declared schema: {exc}") from None


def ok(resp: falcon.Response, data: Any, status: int = 200, links: Any = None, metadata: Any = None) -> None:
    """Write the success envelope {"status": "success", "data": ..., "links"?, "metadata"?}."""
    if getattr(resp.context, "check_responses", False):
        _check(resp, data)
    extra: dict[str, Any] = {}
    if links is not None:
        extra["links"] = msgspec.to_builtins(links)
    if metadata is not None:
        extra["metadata"] = msgspec.to_builtins(metadata)
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = success_body(msgspec.to_builtins(data), **extra)


def raw_json(resp: falcon.Response, body: Any, status: int = 200) -> None:
    """Write a JSON body that is not the envelope (documented with envelope=False)."""
    if getattr(resp.context, "check_responses", False):
        _check(resp, body)
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode(msgspec.to_builtins(body))
