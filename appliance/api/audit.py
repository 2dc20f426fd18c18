"""Audit events: one row per security-relevant action (appliance.db.models.AuditEvent).

Logins (success, failure, lockout), refresh-token reuse, logouts, password and
MFA changes, admin edits of users. Writing an audit row never fails the request
that caused it: a database error is logged instead. Details never hold secrets.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from appliance.db.models import AuditEvent
from appliance.logs import fields

log = logging.getLogger(__name__)


# audit events of appliance.logins that are also counted in appliance_api_auth_events_total{kind}
_AUTH_KINDS = {
    "login_success": "login_success",
    "login_failed": "login_failed",
    "login_refused_locked": "login_locked",
    "login_lockout": "lockout",
}


def sink(req: falcon.Request) -> Any:
    """An appliance.logins audit sink for this request: the audit row (address, request id) and the auth metrics."""
    from appliance.api import instruments

    def write(event: str, *, user_id: int | None = None, username: str | None = None, **details: Any) -> None:
        kind = _AUTH_KINDS.get(event)
        if kind is not None:
            instruments.auth_event(kind)
        record(event, req, user_id=user_id, username=username, **details)

    return write


def record(
    event: str, req: falcon.Request | None = None, *, user_id: int | None = None, username: str | None = None, **details: Any
) -> None:
    """Append one audit event (and a log line) for `event`."""
    from appliance.api.operations import client_address

    address = client_address(req) if req is not None else None
    rid = getattr(req.context, "request_id", None) if req is not None else None
    name = username[:64] if isinstance(username, str) else None
    log.info("audit %s", event, extra=fields(audit=event, user_id=user_id, username=name, address=address, **details))
    try:
        AuditEvent.create(event=event, user_id=user_id, username=name, address=address, request_id=rid, details=details)
    except Exception as exc:
        log.warning("audit event %s not stored: %s", event, str(exc)[:200])
