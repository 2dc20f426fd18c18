"""The data layer on both engines: migrations, constraints, reconnects, revocation."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import urllib.parse

import peewee as pw
import pytest

from appliance import accounts, revocation
from appliance import db as dbmod
from appliance.db.models import Task, TaskHistory, User
from appliance.times import utcnow


def test_migrate_is_idempotent(db) -> None:
    assert dbmod.current_version(db) == dbmod.migrations.MIGRATIONS[-1][0]
    assert dbmod.migrate(db) == []
    assert dbmod.pending(db) == []


def test_json_fields_and_history_round_trip(db) -> None:
    user = User.create(username="alice", email="a@example.com", password_hash="x", preferences={"theme": "dark", "n": [1, 2]})
    task = Task.create(id="t1", task_type="sample", owner=user, input={"msg": "héllo", "nested": {"a": None}})
    TaskHistory.create(task=task, status="queued")
    again = Task.get_by_id("t1")
    assert again.input == {"msg": "héllo", "nested": {"a": None}}
    assert User.get_by_id(user.id).preferences == {"theme": "dark", "n": [1, 2]}
    assert [h.status for h in again.history] == ["queued"]


def test_unique_violation_becomes_conflict(db) -> None:
    User.create(username="bob", email="b@example.com", password_hash="x")
    with pytest.raises(dbmod.Conflict), dbmod.translated(), db.atomic():
        User.create(username="bob", email="other@example.com", password_hash="x")
    assert User.select().count() == 1


def test_accounts_refuse_duplicates_and_bump_generation_on_password_change(db) -> None:
    user = accounts.create_user("carol", "c@example.com", "Str0ng-pass", rounds=10)
    with pytest.raises(accounts.AccountError) as exc:
        accounts.create_user("carol", "c2@example.com", "Str0ng-pass", rounds=10)
    assert exc.value.status == 409
    claims = {"sub": str(user.id), "jti": "j1", "fam": "f1", "gen": user.token_generation}
    assert revocation.check(claims) is None
    accounts.set_password(user, "An0ther-pass", rounds=10, min_length=10)
    assert revocation.check(claims) == "password_changed"
    fresh = {**claims, "gen": User.get_by_id(user.id).token_generation}
    assert revocation.check(fresh) is None


def test_revocation_mirror_sees_new_events(db) -> None:
    mirror = revocation.RevocationMirror()
    mirror.refresh()
    claims = {"sub": "5", "jti": "jx", "fam": "fy", "gen": 0}
    assert mirror.is_revoked(claims) is None
    far = utcnow() + dt.timedelta(days=1)
    revocation.revoke_token("jx", 5, far)
    assert mirror.is_revoked(claims) is None  # not refreshed yet
    assert mirror.refresh() == 1
    assert mirror.is_revoked(claims) == "logout"
    revocation.revoke_family("fz", 5, far, reason="reuse_detected")
    mirror.refresh()
    assert mirror.is_revoked({**claims, "jti": "other", "fam": "fz"}) == "reuse_detected"
    revocation.revoke_generation(5, 3, far, reason="logout_all")
    mirror.refresh()
    assert mirror.is_revoked({"sub": "5", "jti": "a", "fam": "b", "gen": 2}) == "revoked"
    assert mirror.is_revoked({"sub": "5", "jti": "a", "fam": "b", "gen": 3}) is None


def test_expired_revocations_are_purged_and_not_loaded(db) -> None:
    revocation.revoke_token("old", 1, utcnow() - dt.timedelta(seconds=1))
    mirror = revocation.RevocationMirror()
    mirror.refresh()
    assert mirror.is_revoked({"sub": "1", "jti": "old", "fam": "f", "gen": 0}) is None
    assert revocation.purge_expired() == 1


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_query_after_backend_termination_reconnects(db, db_config, pg_url) -> None:
    import psycopg2

    User.create(username="dave", email="d@example.com", password_hash="x")
    db.close()
    assert User.select().count() == 1
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    db.close()  # back to the pool, where it stays open and idle
    killer = psycopg2.connect(pg_url)
    killer.autocommit = True
    with killer.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert cur.fetchone()[0] is True
    killer.close()
    # The pooled connection is dead; the next query must reconnect and succeed.
    assert User.select().count() == 1
    new_pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    assert new_pid != pid


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_query_on_connection_killed_while_in_use_reconnects(db, pg_url) -> None:
    import psycopg2

    db.connect(reuse_if_open=True)
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    killer = psycopg2.connect(pg_url)
    killer.autocommit = True
    with killer.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    killer.close()
    # Same thread still holds the (now dead) connection: the statement reconnects once and runs.
    assert db.execute_sql("SELECT 1").fetchone()[0] == 1


def _fresh_pg_database(pg_url: str, name: str) -> str:
    import psycopg2

    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return urllib.parse.urlunparse(urllib.parse.urlparse(pg_url)._replace(path="/" + name))


def test_two_processes_migrating_at_once_apply_each_migration_once(engine, make_config, request, tmp_path) -> None:
    if engine == "postgresql":
        url = _fresh_pg_database(request.getfixturevalue("pg_url"), "appliance_migrate_race")
        cfg = make_config(database={"url": url})
    else:
        cfg = make_config()
    script = textwrap.dedent(
        f"""
        import sys
        from appliance.config import load_config
        from appliance import db
        cfg = load_config({cfg.source!r}, env={{}})
        handle = db.open_database(cfg)
        applied = db.migrate(handle)
        print(len(applied))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    counts = sorted(int(out.strip()) for out, _ in outs)
    assert counts == [0, 0, len(dbmod.migrations.MIGRATIONS)]
    handle = dbmod.open_database(cfg)
    rows = handle.execute_sql("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [v for v, _, _ in dbmod.migrations.MIGRATIONS]
    handle.close()


def test_sqlite_pragmas_are_set(make_config) -> None:
    cfg = make_config()
    handle = dbmod.open_database(cfg)
    assert handle.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert handle.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert handle.execute_sql("PRAGMA busy_timeout").fetchone()[0] == cfg.database.busy_timeout_ms
    assert isinstance(handle, pw.SqliteDatabase)
    handle.close()


def test_revocation_mirror_thread_follows_new_events(db) -> None:
    import time

    mirror = revocation.RevocationMirror(interval=0.05)
    mirror.start(db)
    try:
        claims = {"sub": "9", "jti": "jt", "fam": "fm", "gen": 0}
        deadline = time.monotonic() + 5
        while not mirror.healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mirror.healthy and mirror.is_revoked(claims) is None
        revocation.revoke_token("jt", 9, utcnow() + dt.timedelta(days=1))
        while mirror.is_revoked(claims) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mirror.is_revoked(claims) == "logout"
    finally:
        mirror.stop()
