"""Versioned migrations: applied once each, in order, under a lock.

`schema_version` records every applied migration. `migrate()` takes an
exclusive lock first (PostgreSQL: a transaction-level advisory lock; SQLite:
BEGIN IMMEDIATE), then reads the version and applies what is missing in the
same transaction, so two processes migrating at once serialise and the second
finds nothing to do. DDL is transactional on both engines: a failing
migration leaves the schema as it was.

To change the schema after a release, append a function to MIGRATIONS (use
playhouse.migrate's schema_migrator for columns); never edit an applied one.
A migration that cannot run on the data it finds raises MigrationRefused
naming the rows at fault; nothing of it is applied and the version stays.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee as pw

from appliance.db import models as m
from appliance.db.errors import DatabaseError
from appliance.db.models import database
from appliance.times import utcnow

_LOCK_KEY = 0x4150504C  # "APPL": advisory lock id for migrations


class SchemaVersion(pw.Model):
    version = pw.IntegerField(primary_key=True)
    name = pw.CharField(max_length=200)
    applied_at = pw.DateTimeField(default=utcnow)

    class Meta:
        database = database
        table_name = "schema_version"


class MigrationRefused(DatabaseError):
    """A migration cannot run on the data it found; the message names the rows and what to do."""


# The tables of release 1. Tables added later are created by their own migration,
# so migration 1 means the same thing on every database.
_INITIAL_MODELS = [
    m.User,
    m.TokenFamily,
    m.RevocationEvent,
    m.LoginThrottle,
    m.TaskGroup,
    m.Schedule,
    m.Task,
    m.TaskHistory,
    m.TaskLog,
    m.ScheduleRun,
    m.NodeHeartbeat,
    m.AuditEvent,
    m.Upload,
    m.DataRecord,
]


def _initial(db: pw.Database) -> None:
    db.create_tables(_INITIAL_MODELS, safe=True)


def _recovery_codes(db: pw.Database) -> None:
    db.create_tables([m.RecoveryCode], safe=True)


def _username_clashes(db: pw.Database) -> list[tuple[int, str]]:
    """(id, username) of every user whose name equals another's ignoring case."""
    sql = (
        'SELECT id, username FROM "user" WHERE lower(username) IN '
        '(SELECT lower(username) FROM "user" GROUP BY lower(username) HAVING COUNT(*) > 1) '
        "ORDER BY lower(username), id"
    )
    return [(int(row[0]), str(row[1])) for row in db.execute_sql(sql).fetchall()]


def _usernames_unique_ignoring_case(db: pw.Database) -> None:
    clashes = _username_clashes(db)
    if clashes:
        shown = ", ".join(f"{name!r} (id {uid})" for uid, name in clashes[:20])
        more = f" and {len(clashes) - 20} more" if len(clashes) > 20 else ""
        raise MigrationRefused(
            "user names must be unique ignoring case, but these users clash: "
            f"{shown}{more}; rename or delete all but one of each group, then run `appliance migrate` again"
        )
    # lower() of an expression index: the same statement on SQLite and PostgreSQL
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "user_username_lower" ON "user" (lower(username))')


# Covered by a composite index that leads with the same column (owner, status, group), or
# never searched alone (worker_id is read only among running tasks). Databases made since
# build none of them; older ones drop them here.
_REDUNDANT_TASK_INDEXES = ("task_status", "task_owner_id", "task_group_id", "task_worker_id")


def _drop_redundant_task_indexes(db: pw.Database) -> None:
    for name in _REDUNDANT_TASK_INDEXES:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


MIGRATIONS: list[tuple[int, str, Callable[[pw.Database], None]]] = [
    (1, "initial schema", _initial),
    (2, "MFA recovery codes", _recovery_codes),
    (3, "user names unique ignoring case", _usernames_unique_ignoring_case),
    (4, "drop redundant task indexes", _drop_redundant_task_indexes),
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


def migrate(db: pw.Database | None = None, target: int | None = None) -> list[tuple[int, str]]:
    """Apply every pending migration (up to version `target` when given); return those applied.

    Raises MigrationRefused when a migration cannot run on the existing data:
    then none of this call's migrations is applied.
    """
    db = db or database.obj
    applied: list[tuple[int, str]] = []
    with _locked(db):
        if not isinstance(db, pw.SqliteDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        db.create_tables([SchemaVersion], safe=True)
        have = SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar() or 0
        for version, name, apply in MIGRATIONS:
            if version <= have or (target is not None and version > target):
                continue
            apply(db)
            SchemaVersion.create(version=version, name=name)
            applied.append((version, name))
    return applied
