"""Database errors translated at the boundary: nobody above appliance.db catches sqlite3 or psycopg2.

peewee already wraps driver errors into its own classes (keeping the original
as __cause__); we map those onto three of ours that callers act on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import peewee as pw


class DatabaseError(Exception):
    """Base of our database errors; `__cause__` holds the driver's exception."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached now (down, restarting, locked too long); retry later."""


class Conflict(DatabaseError):
    """A uniqueness or foreign-key constraint refused the write."""


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Run a block with peewee/driver errors turned into ours."""
    try:
        yield
    except pw.IntegrityError as exc:
        raise Conflict(str(exc)) from exc
    except (pw.OperationalError, pw.InterfaceError) as exc:
        raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc
    except pw.DatabaseError as exc:
        raise DatabaseError(str(exc).strip() or type(exc).__name__) from exc
