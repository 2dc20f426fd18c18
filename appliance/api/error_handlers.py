"""Exceptions become responses here, and only here.

- AppError (appliance.errors) -> its status, code, message, details, headers; the core's
  errors (AccountError, TokenError, IdentityError, LoginRefused, the database errors) are
  AppErrors, so they take this path too.
- a raw peewee error -> translated by appliance.db.errors.translate, then as above.
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

from appliance.db import errors as dberrors
from appliance.errors import AppError, error_body
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
    if isinstance(ex, dberrors.DatabaseError):
        _log_database(req, ex)
    for name, value in ex.headers.items():
        resp.set_header(name, value)
    _write(req, resp, ex.status, ex.code, ex.message, ex.details)


def _log_database(req: falcon.Request, ex: dberrors.DatabaseError) -> None:
    if isinstance(ex, dberrors.DatabaseUnavailable):
        log.warning("database unavailable: %s", str(ex)[:300], extra=fields(path=req.path))
    elif not isinstance(ex, dberrors.ConstraintConflict):  # our bug or the schema's: keep the traceback
        log.error("database error in %s %s", req.method, req.path, exc_info=ex, extra=fields(path=req.path, method=req.method))


def _peewee_error(req: falcon.Request, resp: falcon.Response, ex: pw.PeeweeException, params: Any) -> None:
    """A raw peewee error that no `translated()` block caught: translated here, then answered as ours."""
    err = dberrors.translate(ex)
    err.__cause__ = ex
    _app_error(req, resp, err, params)


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
    app.add_error_handler(pw.PeeweeException, _peewee_error)
