"""Versioned migrations: applied once each, in order, under a lock.

`schema_version` records every applied migration. `migrate()` takes an
exclusive lock first (PostgreSQL: a transaction-level advisory lock; SQLite:
BEGIN IMMEDIATE), then reads the version and applies what is missing in the
same transaction, so two processes migrating at once serialise and the second
finds nothing to do. DDL is transactional on both engines: a failing
migration leaves the schema as it was.

To change the schema after a release, append a function to MIGRATIONS (use
playhouse.migrate's schema_migrator for columns); never edit an applied one.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee as pw

from appliance.db.models import ALL_MODELS, database
from appliance.times import utcnow

_LOCK_KEY = 0x4150504C  # "APPL": advisory lock id for migrations


class SchemaVersion(pw.Model):
    version = pw.IntegerField(primary_key=True)
    name = pw.CharField(max_length=200)
    applied_at = pw.DateTimeField(default=utcnow)

    class Meta:
        database = database
        table_name = "schema_version"


def _initial(db: pw.Database) -> None:
    db.create_tables(ALL_MODELS, safe=True)


MIGRATIONS: list[tuple[int, str, Callable[[pw.Database], None]]] = [
    (1, "initial schema", _initial),
]


def _locked(db: pw.Database) -> pw._atomic:
    if isinstance(db, pw.SqliteDatabase):
        return db.atomic(lock_type="IMMEDIATE")
    return db.atomic()


def current_version(db: pw.Database | None = None) -> int:
    db = db or database.obj
    if not db.table_exists("schema_version"):
        return 0
    return SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar() or 0


def pending(db: pw.Database | None = None) -> list[tuple[int, str]]:
    have = current_version(db)
    return [(v, name) for v, name, _ in MIGRATIONS if v > have]


def migrate(db: pw.Database | None = None) -> list[tuple[int, str]]:
    """Apply every pending migration; return those applied (empty when up to date)."""
    db = db or database.obj
    applied: list[tuple[int, str]] = []
    with _locked(db):
        if not isinstance(db, pw.SqliteDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        db.create_tables([SchemaVersion], safe=True)
        have = SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar() or 0
        for version, name, apply in MIGRATIONS:
            if version <= have:
                continue
            apply(db)
            SchemaVersion.create(version=version, name=name)
            applied.append((version, name))
    return applied
