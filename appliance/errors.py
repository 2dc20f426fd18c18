"""One error hierarchy and one envelope for every HTTP answer of the appliance.

Everything the API raises for a client descends from AppError (status, code,
message, details, headers), as every falcon error descends from HTTPError: the
core's own errors too (accounts.AccountError, tokens.TokenError,
identity.IdentityError, logins.LoginRefused, and appliance.db.errors'
DatabaseError family, which peewee errors are translated into). The API
renders an AppError in one handler; it and the balancer build the body with
`error_body`, so every error a client sees has the same shape:
{"status": "error", "error": {"code", "message", "details"?, "request_id"?}}.
"""

from __future__ import annotations

from typing import Any

import orjson


def error_body(code: str, message: str, details: dict[str, Any] | None = None, request_id: str | None = None) -> bytes:
    """The JSON error envelope, as bytes."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    if request_id:
        err["request_id"] = request_id
    return orjson.dumps({"status": "error", "error": err})


def success_body(data: Any, **extra: Any) -> bytes:
    """The JSON success envelope, as bytes (extra: links, metadata, ...)."""
    return orjson.dumps({"status": "success", "data": data, **extra})


class AppError(Exception):
    """A client-facing error: HTTP status, snake_case code, human sentence, optional details.

    `message` is what the client reads; `reason`, when given, is what `str()` says
    instead (for logs and operators: a driver's text, why a signature failed), so
    an error can keep its cause without showing it to the client.
    """

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(reason or message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.details = details or {}
        self.headers = headers or {}


class BadRequest(AppError):
    status, code = 400, "bad_request"


class ValidationFailed(AppError):
    """Input failed validation; details name the field."""

    status, code = 400, "validation_error"

    def __init__(self, message: str, field: str | None = None, **kw: Any):
        details = kw.pop("details", None) or {}
        if field:
            details.setdefault("field", field)
        super().__init__(message, details=details, **kw)


class Unauthorized(AppError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str = "authentication required", **kw: Any):
        headers = kw.pop("headers", None) or {}
        headers.setdefault("WWW-Authenticate", 'Bearer realm="appliance"')
        super().__init__(message, headers=headers, **kw)


class Forbidden(AppError):
    status, code = 403, "forbidden"


class NotFound(AppError):
    status, code = 404, "not_found"


class MethodNotAllowed(AppError):
    status, code = 405, "method_not_allowed"


class Conflict(AppError):
    status, code = 409, "conflict"


class PayloadTooLarge(AppError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(AppError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(AppError):
    status, code = 422, "unprocessable"


class TooManyRequests(AppError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str = "too many requests", retry_after: int = 1, **kw: Any):
        headers = kw.pop("headers", None) or {}
        headers.setdefault("Retry-After", str(max(1, int(retry_after))))
        super().__init__(message, headers=headers, **kw)


class ServiceUnavailable(AppError):
    status, code = 503, "service_unavailable"
