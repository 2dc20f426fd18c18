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
    with pytest.raises(dbmod.ConstraintConflict), dbmod.translated(), db.atomic():
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
    revocation.revoke_token("old", 1, utcnow() - dt.timedelta(seconds=20))
    mirror = revocation.RevocationMirror(leeway=10)
    mirror.refresh()
    assert mirror.is_revoked({"sub": "1", "jti": "old", "fam": "f", "gen": 0}) is None
    assert revocation.purge_expired() == 1


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_query_after_backend_termination_reconnects(db, db_config, pg_url) -> None:
    User.create(username="dave", email="d@example.com", password_hash="x")
    db.close()
    assert User.select().count() == 1
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    db.close()  # back to the pool, where it stays open and idle
    assert _terminate(pg_url, pid) is True
    # The pooled connection is dead; the next query must reconnect and succeed.
    assert User.select().count() == 1
    new_pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    assert new_pid != pid


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_query_on_connection_killed_while_in_use_reconnects(db, pg_url) -> None:
    db.connect(reuse_if_open=True)
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    _terminate(pg_url, pid)
    # Same thread still holds the (now dead) connection: the statement reconnects once and runs.
    assert db.execute_sql("SELECT 1").fetchone()[0] == 1


def _on_the_side(pg_url: str, sql: str, pid: int) -> object:
    """The first column of `sql` (one parameter: a backend pid), run on a connection of its own."""
    import psycopg2

    side = psycopg2.connect(pg_url)
    side.autocommit = True
    try:
        with side.cursor() as cur:
            cur.execute(sql, (pid,))
            return cur.fetchone()[0]
    finally:
        side.close()


def _terminate(pg_url: str, pid: int) -> object:
    return _on_the_side(pg_url, "SELECT pg_terminate_backend(%s)", pid)


def _last_query(pg_url: str, pid: int) -> object:
    return _on_the_side(pg_url, "SELECT query FROM pg_stat_activity WHERE pid = %s", pid)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_connection_back_in_the_pool_a_moment_ago_is_handed_out_without_a_probe(db, pg_url) -> None:
    from appliance.db.connection import PROBE_IDLE_SECONDS

    db.connect(reuse_if_open=True)
    pid = db.execute_sql("SELECT pg_backend_pid() AS marker_one").fetchone()[0]
    db.close()
    db.connect()  # the same pooled connection, used a moment ago: trusted on its local state, no round trip
    assert "marker_one" in _last_query(pg_url, pid)
    assert db.execute_sql("SELECT pg_backend_pid()").fetchone()[0] == pid
    db.close()
    import time

    time.sleep(PROBE_IDLE_SECONDS + 0.2)
    db.connect()  # idle for longer: the pool probes it first (peewee's SELECT 1)
    assert _last_query(pg_url, pid) == "SELECT 1"
    db.close()


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_connection_that_died_idle_is_replaced_before_a_transaction_uses_it(db, pg_url) -> None:
    import time

    from appliance.db.connection import PROBE_IDLE_SECONDS

    db.connect(reuse_if_open=True)
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    db.close()
    _terminate(pg_url, pid)
    time.sleep(PROBE_IDLE_SECONDS + 0.2)
    with db.connection_context(), db.atomic():  # inside a transaction no statement reconnects: the probe must catch it
        User.create(username="erin", email="e@example.com", password_hash="x")
        assert db.execute_sql("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert User.select().where(User.username == "erin").count() == 1


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


def test_a_role_migrates_a_stale_database_unless_it_runs_the_config_the_supervisor_migrated(make_config, monkeypatch) -> None:
    from appliance import child_config

    by_hand, inherited = make_config(), make_config()
    monkeypatch.setattr(child_config, "_inherited", None)
    child_config.inherit_config(inherited)  # the supervisor migrates this one before it forks any child
    for cfg, expected in ((by_hand, [v for v, _, _ in dbmod.migrations.MIGRATIONS]), (inherited, [])):
        handle = dbmod.open_for_role(cfg)
        handle.connect(reuse_if_open=True)
        have = (
            handle.execute_sql("SELECT version FROM schema_version ORDER BY version").fetchall()
            if handle.table_exists("schema_version")
            else []
        )
        assert [r[0] for r in have] == expected
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


def test_revocation_mirror_forgets_each_entry_once_its_tokens_expired(db) -> None:
    from appliance.times import from_timestamp

    t0 = 1_900_000_000.0  # the mirror's clock is a parameter: no sleeping
    leeway = 10
    mirror = revocation.RevocationMirror(leeway=leeway)
    revocation.revoke_token("j1", 1, from_timestamp(t0 + 60))
    revocation.revoke_family("f1", 1, from_timestamp(t0 + 120))
    revocation.revoke_generation(1, 2, from_timestamp(t0 + 180), "logout_all")
    for i in range(50):  # a burst of logouts whose access tokens expire soon
        revocation.revoke_token(f"short{i}", 2, from_timestamp(t0 + 30))
    assert mirror.refresh(now=t0) == 53 and len(mirror) == 53
    by_jti = {"sub": "9", "jti": "j1", "fam": "-", "gen": 0}
    by_family = {"sub": "9", "jti": "-", "fam": "f1", "gen": 0}
    by_generation = {"sub": "1", "jti": "-", "fam": "-", "gen": 1}
    mirror.refresh(now=t0 + 30 + leeway + 1)
    assert len(mirror) == 3, "entries of expired tokens are dropped"
    mirror.refresh(now=t0 + 60 + leeway - 1)
    assert mirror.is_revoked(by_jti) == "logout", "kept through the leeway: the token may still be accepted"
    mirror.refresh(now=t0 + 60 + leeway + 1)
    assert mirror.is_revoked(by_jti) is None and mirror.is_revoked(by_family) == "logout" and len(mirror) == 2
    mirror.refresh(now=t0 + 120 + leeway + 1)
    assert mirror.is_revoked(by_family) is None and mirror.is_revoked(by_generation) == "revoked" and len(mirror) == 1
    mirror.refresh(now=t0 + 180 + leeway + 1)
    assert mirror.is_revoked(by_generation) is None and len(mirror) == 0


def test_revocation_mirror_keeps_an_entry_as_long_as_its_latest_event(db) -> None:
    from appliance.times import from_timestamp

    t0 = 1_900_000_000.0
    mirror = revocation.RevocationMirror(leeway=0)
    revocation.revoke_generation(3, 1, from_timestamp(t0 + 100), "logout_all")
    mirror.refresh(now=t0)
    revocation.revoke_generation(3, 2, from_timestamp(t0 + 500), "password_changed")
    revocation.revoke_family("fam", 3, from_timestamp(t0 + 50))
    revocation.revoke_family("fam", 3, from_timestamp(t0 + 400))
    mirror.refresh(now=t0 + 1)
    mirror.refresh(now=t0 + 200)
    assert mirror.is_revoked({"sub": "3", "jti": "x", "fam": "y", "gen": 1}) == "revoked"
    assert mirror.is_revoked({"sub": "3", "jti": "x", "fam": "fam", "gen": 9}) == "logout"
    mirror.refresh(now=t0 + 501)
    assert len(mirror) == 0


def test_recovery_codes_table_exists_after_migration(db) -> None:
    from appliance.db.models import RecoveryCode

    user = User.create(username="rita", email="r@example.com", password_hash="x")
    RecoveryCode.create(user=user, code_hash="h" * 64)
    with pytest.raises(dbmod.ConstraintConflict), dbmod.translated(), db.atomic():
        RecoveryCode.create(user=user, code_hash="h" * 64)


def _unmigrated_database(engine: str, make_config, request, pg_name: str) -> pw.Database:
    """An open handle on an empty database of `engine` (PostgreSQL: a fresh one named `pg_name`), not yet migrated."""
    if engine == "postgresql":
        url = _fresh_pg_database(request.getfixturevalue("pg_url"), pg_name)
        return dbmod.open_database(make_config(database={"url": url}))
    return dbmod.open_database(make_config())


def test_case_clashing_user_names_make_the_migration_refuse_naming_them(engine, make_config, request) -> None:
    from appliance.db import migrations

    handle = _unmigrated_database(engine, make_config, request, "appliance_migrate_clash")
    try:
        migrations.migrate(handle, target=2)  # a database from before the case-insensitive index
        ids = {}
        for name in ("admin", "bob", "Admin", "BOB", "carol"):
            ids[name] = User.create(username=name, email=f"{name.lower()}{len(ids)}@example.com", password_hash="x").id
        with pytest.raises(migrations.MigrationRefused) as refused:
            dbmod.migrate(handle)
        text = str(refused.value)
        for name in ("admin", "Admin", "bob", "BOB"):
            assert f"{name!r} (id {ids[name]})" in text
        assert "carol" not in text and "appliance migrate" in text
        assert dbmod.current_version(handle) == 2  # nothing applied
        assert isinstance(refused.value, dbmod.DatabaseError)  # the CLI and the supervisor report it as such
        User.update(username="admin-old").where(User.id == ids["Admin"]).execute()
        User.delete().where(User.id == ids["BOB"]).execute()
        assert dbmod.migrate(handle) == [(v, name) for v, name, _ in migrations.MIGRATIONS if v > 2]
        with pytest.raises(dbmod.ConstraintConflict), dbmod.translated(), handle.atomic():
            User.create(username="CAROL", email="c2@example.com", password_hash="x")
    finally:
        handle.close_all() if hasattr(handle, "close_all") else handle.close()


_COMPOSITE_TASK_INDEXES = {"task_owner_id_status_created_at", "task_status_priority_created_at", "task_group_id_group_index"}


def test_migration_4_drops_the_task_indexes_a_composite_covers(engine, make_config, request) -> None:
    from appliance.db import migrations

    handle = _unmigrated_database(engine, make_config, request, "appliance_migrate_indexes")
    try:
        migrations.migrate(handle, target=3)
        fresh = {ix.name for ix in handle.get_indexes("task")}
        assert _COMPOSITE_TASK_INDEXES <= fresh and "task_task_type" in fresh
        assert not fresh & set(migrations._REDUNDANT_TASK_INDEXES), "a new database never builds them"
        # a database made by an older release has them: build them as release 3 did
        for name, column in (
            ("task_status", "status"),
            ("task_owner_id", "owner_id"),
            ("task_group_id", "group_id"),
            ("task_worker_id", "worker_id"),
        ):
            handle.execute_sql(f'CREATE INDEX "{name}" ON "task" ("{column}")')
        assert set(migrations._REDUNDANT_TASK_INDEXES) <= {ix.name for ix in handle.get_indexes("task")}
        assert dbmod.migrate(handle) == [(4, "drop redundant task indexes")]
        assert {ix.name for ix in handle.get_indexes("task")} == fresh
    finally:
        handle.close_all() if hasattr(handle, "close_all") else handle.close()
