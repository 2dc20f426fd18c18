"""Exceptions become responses here, and only here.

- AppError (appliance.errors) -> its status, code, message, details, headers.
- AccountError, TokenError, IdentityError, database errors -> the AppError they mean.
- falcon's own HTTPError (404 no route, 405, 400 bad params, 413, 415, ...) -> the same envelope.
- anything else -> logged with its traceback, answered as a plain 500 with the request id;
  no stack trace or exception text ever reaches the client.
Every body is appliance.errors.error_body and carries the request id.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import peewee as pw

from appliance import accounts, tokens
from appliance.db import errors as dberrors
from appliance.errors import AppError, error_body
from appliance.identity import IdentityError
from appliance.logs import fields

log = logging.getLogger(__name__)

_FALCON_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    503: "service_unavailable",
}


def _write(req: falcon.Request, resp: falcon.Response, status: int, code: str, message: str, details: Any = None) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_body(code, message, details or None, getattr(req.context, "request_id", None))


def _app_error(req: falcon.Request, resp: falcon.Response, ex: AppError, params: Any) -> None:
    for name, value in ex.headers.items():
        resp.set_header(name, value)
    _write(req, resp, ex.status, ex.code, ex.message, ex.details)


def _account_error(req: falcon.Request, resp: falcon.Response, ex: accounts.AccountError, params: Any) -> None:
    _write(req, resp, ex.status, ex.code, ex.message, {"field": ex.field} if ex.field else None)


def _token_error(req: falcon.Request, resp: falcon.Response, ex: tokens.TokenError, params: Any) -> None:
    resp.set_header("WWW-Authenticate", f'Bearer realm="appliance", error="invalid_token", error_description="{ex.message}"')
    _write(req, resp, 401, ex.code, ex.message)


def _identity_error(req: falcon.Request, resp: falcon.Response, ex: IdentityError, params: Any) -> None:
    _write(req, resp, 401, "invalid_identity", "the identity header is not valid")


def _db_unavailable(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
    log.warning("database unavailable: %s", str(ex).strip()[:300], extra=fields(path=req.path))
    resp.set_header("Retry-After", "2")
    _write(req, resp, 503, "database_unavailable", "the database is not available; try again shortly")


def _db_conflict(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
    _write(req, resp, 409, "conflict", "the change conflicts with existing data")


def _falcon_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any) -> None:
    status = ex.status_code
    for name, value in (ex.headers or {}).items():
        resp.set_header(name, value)
    code = _FALCON_CODES.get(status, "error")
    if status == 404:
        message = f"no route for {req.method} {req.path[:200]}" if isinstance(ex, falcon.HTTPRouteNotFound) else "not found"
    elif status == 405:
        message = f"method {req.method} is not allowed here"
    else:
        message = ex.title or code.replace("_", " ")
        if ex.description:
            message = f"{message}: {ex.description}"
    _write(req, resp, status, code, message)


def _unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
    if isinstance(ex, falcon.HTTPStatus):  # pragma: no cover - falcon's own handler is more specific
        raise ex
    log.error("unhandled error in %s %s", req.method, req.path, exc_info=ex, extra=fields(path=req.path, method=req.method))
    _write(req, resp, 500, "internal_error", "the server hit an unexpected error; the request id identifies it in the logs")


def install(app: falcon.App) -> None:
    """Register every handler; falcon picks the most specific by MRO."""
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(falcon.HTTPError, _falcon_error)
    app.add_error_handler(AppError, _app_error)
    app.add_error_handler(accounts.AccountError, _account_error)
    app.add_error_handler(tokens.TokenError, _token_error)
    app.add_error_handler(IdentityError, _identity_error)
    app.add_error_handler(dberrors.DatabaseUnavailable, _db_unavailable)
    app.add_error_handler(pw.OperationalError, _db_unavailable)
    app.add_error_handler(pw.InterfaceError, _db_unavailable)
    app.add_error_handler(dberrors.Conflict, _db_conflict)
    app.add_error_handler(pw.IntegrityError, _db_conflict)
