"""The API workers: a Falcon 4 WSGI app served by waitress, one process per port.

Layout
    app.py             create_app(cfg, index=0) -> falcon.App; ROUTE_MODULES lists every route module;
                       prebuild(cfg) in the template, adopt_prebuilt(cfg, index, db) in each worker
    context.py         ApiContext (cfg, db, tokens, identity_key, revocations, node_id, lazy .queue) and Identity
    operations.py      @operation, require_user/require_admin, client_address, ok/raw_json, Page/paginate
    readers.py         read_json/read_query/read_body: the request's body and query, validated
    middleware.py      request id, identity, security headers + gzip, metrics, pooled-connection release
    error_handlers.py  the one place exceptions become the error envelope
    openapi.py schemas.py   GET /openapi.json, built by walking the router and reading each @operation
    server.py          serve(cfg, index): waitress on a loopback port (kernel-picked or base_port+index)
    operator_apps.py   operator modules from [api] apps_dir
    health.py auth.py mfa.py users.py stats.py   the built-in routes (sessions.py audit.py profilecache.py
                       instruments.py: their parts)
    tasks.py data.py   the task and data routes over appliance.tasks (optional in a build)

Conventions for a route module (built-in, tasks/data, or an operator app)
- It exposes `register(app, ctx)` (operator apps: `setup(app, ctx)`) and adds plain
  Falcon resources with `app.add_route(template, resource)`. Register the module in
  app.ROUTE_MODULES (optional ones are imported only when present).
- Every responder is decorated with `@operation(summary, request=Struct, response=Struct,
  query=Struct, auth=None|"user"|"admin", status=200, errors=(...), paginated=False, ...)`.
  `auth` is enforced before the responder runs (401 without/with bad credentials,
  403 for a non-admin on "admin"); the same declaration is what /openapi.json shows.
- Bodies: `read_json(req, Struct)` -> validated Struct (400 `validation_error` with
  details.field, 400 `invalid_json`, 413 over [api] max_body_bytes, 415 not JSON).
  Query strings: `read_query(req, Struct)` (strings converted to the field types).
  Lists: subclass `Page` for the query, `rows, meta = paginate(peewee_query, page)`,
  then `ok(resp, items, metadata=meta)` with `paginated=True` on the operation.
- Success: `ok(resp, data, status=200, links=None, metadata=None)` writes
  {"status": "success", "data": ..., "links"?, "metadata"?}; `data` may be a Struct,
  dict or list. Declare `response=` as the type of `data`.
- Errors: raise appliance.errors.AppError subclasses (BadRequest, ValidationFailed,
  Unauthorized, Forbidden, NotFound, Conflict, TooManyRequests, ...); the core's
  AccountError, TokenError and database errors are AppErrors too, and a raw peewee error
  is translated by appliance.db.errors; anything else is logged with its traceback and
  answered as a 500 envelope with the request id.
- The caller: `require_user(req)` / `require_admin(req)` return an Identity
  (user_id, username, role, jti, family, generation; `is_admin`).
  `current_identity(req)` returns None for anonymous callers.
- Context: `ctx.cfg`, `ctx.db` (peewee database, models are already bound),
  `ctx.queue` (Huey, made on first use), `ctx.node_id`, `ctx.index`.
- Metrics per route are recorded by the middleware; nothing to do in a module.
"""

from appliance.api.context import ApiContext, Identity
from appliance.api.operations import (
    Operation,
    Page,
    PageMeta,
    client_address,
    current_identity,
    ok,
    operation,
    paginate,
    raw_json,
    require_admin,
    require_user,
)
from appliance.api.readers import read_json, read_query

__all__ = [
    "ApiContext",
    "Identity",
    "Operation",
    "Page",
    "PageMeta",
    "client_address",
    "current_identity",
    "ok",
    "operation",
    "paginate",
    "raw_json",
    "read_json",
    "read_query",
    "require_admin",
    "require_user",
]
