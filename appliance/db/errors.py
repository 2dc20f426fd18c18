"""Database errors translated at the boundary: nobody above appliance.db catches sqlite3 or psycopg2.

peewee already wraps driver errors into its own classes (keeping the original
as __cause__); `translate` maps those onto ours, in this one place: the
`translated()` block for code that acts on them, and the API's error handler
for a raw peewee error that escaped one. Ours are AppErrors, so the API answers
them like any other error: the client gets a fixed sentence (no SQL, no driver
text), `str(exc)` keeps the driver's words for logs and the command line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import peewee as pw

from appliance.errors import AppError

_INTERNAL = "the server hit an unexpected error; the request id identifies it in the logs"


class DatabaseError(AppError):
    """Base of our database errors; `__cause__` holds the driver's exception, `str()` its text (500 to a client)."""

    status, code = 500, "internal_error"
    client_message = _INTERNAL

    def __init__(self, reason: str):
        super().__init__(self.client_message, reason=reason)


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached now (down, restarting, locked too long); retry later (503)."""

    status, code = 503, "database_unavailable"
    client_message = "the database is not available; try again shortly"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.headers["Retry-After"] = "2"


class ConstraintConflict(DatabaseError):
    """A uniqueness or foreign-key constraint refused the write (409)."""

    status, code = 409, "conflict"
    client_message = "the change conflicts with existing data"


def _text(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def translate(exc: pw.PeeweeException) -> DatabaseError:
    """Our error for a peewee one (chain it: `raise translate(exc) from exc`)."""
    if isinstance(exc, pw.IntegrityError):
        return ConstraintConflict(_text(exc))
    if isinstance(exc, (pw.OperationalError, pw.InterfaceError)):
        return DatabaseUnavailable(_text(exc))
    return DatabaseError(_text(exc))


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Run a block with peewee/driver errors turned into ours."""
    try:
        yield
    except pw.PeeweeException as exc:
        raise translate(exc) from exc
