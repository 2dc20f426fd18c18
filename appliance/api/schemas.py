"""Structs shared by several route modules: the envelopes' parts and the user views.

Route modules declare their own request/response Structs next to their
resources; what more than one module needs lives here. Every Struct here is
both the validator and (through appliance.api.openapi) the documented schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: Annotated[str, Meta(description="snake_case error code")]
    message: Annotated[str, Meta(description="human sentence")]
    details: dict[str, Any] | None = None
    request_id: str | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """Every error response of the appliance."""

    status: Literal["error"]
    error: ErrorInfo


class UserOut(msgspec.Struct, kw_only=True):
    """A user as clients see it (never hashes or MFA secrets)."""

    id: int
    username: str
    email: str
    role: Literal["admin", "user"]
    is_active: bool
    full_name: str
    department: str
    mfa_enabled: bool
    login_count: int
    last_login: str | None
    created_at: str | None


class UserEnvelope(msgspec.Struct, kw_only=True):
    user: UserOut


def user_out(user: Any) -> UserOut:
    from appliance.accounts import public_view

    return msgspec.convert(public_view(user), UserOut)


class Empty(msgspec.Struct, kw_only=True):
    """A request body with no fields (anything sent is ignored)."""


class Message(msgspec.Struct, kw_only=True):
    message: str


_REFINEMENTS: dict[Any, dict[str, Any]] = {}


def refine(kind: Any, **schema: Any) -> None:
    """Add JSON Schema keywords to the component of Struct `kind`: a rule its fields alone cannot say
    (e.g. oneOf for "exactly one of"); the validator that enforces it is declared next to the call."""
    _REFINEMENTS.setdefault(kind, {}).update(schema)


def refinements() -> dict[Any, dict[str, Any]]:
    """Every refine() so far (read by appliance.api.openapi)."""
    return dict(_REFINEMENTS)
