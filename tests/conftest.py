"""Shared fixtures: configs in temp dirs, and the real PostgreSQL and Redis servers.

PostgreSQL: a fresh database per test on APPLIANCE_TEST_PG_URL
(default postgresql://postgres@127.0.0.1:5432/postgres), dropped after.
Redis: APPLIANCE_TEST_REDIS_URL (default redis://127.0.0.1:6379/0) with a
fresh key prefix, whose keys are deleted after. When a server cannot be
reached its tests skip naming the URL, except with CI=true: then they fail.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get("APPLIANCE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("APPLIANCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unreachable(what: str, url: str, exc: Exception) -> None:
    safe = url.split("@")[-1]
    message = f"{what} at {safe} cannot be reached ({type(exc).__name__}: {str(exc).strip()[:200]})"
    if IN_CI:
        pytest.fail(message + "; CI=true requires it", pytrace=False)
    pytest.skip(message)


def _with_db(url: str, name: str) -> str:
    p = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse(p._replace(path="/" + name))


@pytest.fixture(scope="session")
def _pg_admin() -> Iterator[Any]:
    """One autocommit connection to the server's maintenance database, for creating test databases."""
    import psycopg2

    try:
        admin = psycopg2.connect(PG_URL, connect_timeout=5)
    except psycopg2.Error as exc:
        _unreachable("PostgreSQL", PG_URL, exc)
    admin.autocommit = True
    try:
        yield admin
    finally:
        for name in _LEFTOVERS:
            _drop(admin, name, attempts=40)
        admin.close()


_LEFTOVERS: list[str] = []  # test databases not dropped at once (see _drop), tried again at the end


def _drop(admin: Any, name: str, attempts: int = 8) -> bool:
    """DROP DATABASE name WITH (FORCE); True once it is gone.

    FORCE terminates the database's sessions, but an autovacuum worker on it belongs to the
    server's superuser, which the test role may not terminate: it ends within a moment, so retry.
    """
    import psycopg2

    for _ in range(attempts):
        try:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return True
        except psycopg2.errors.InsufficientPrivilege:
            time.sleep(0.25)
    return False


@pytest.fixture
def pg_url(_pg_admin: Any) -> Iterator[str]:
    """URL of a fresh PostgreSQL database of this test's own, dropped after it (about 40 ms).

    Per test, not per session: the database holds state that outlives a test and changes another's
    outcome (the login lockout of 127.0.0.1 after a fuzzer's failed logins, users named alike).
    """
    name = f"appliance_test_{secrets.token_hex(4)}"
    with _pg_admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_URL, name)
    finally:
        if not _drop(_pg_admin, name):
            _LEFTOVERS.append(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[dict[str, str]]:
    """{"url", "prefix"}: the Redis server and a key prefix of our own, cleaned after the session."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unreachable("Redis", REDIS_URL, exc)
    prefix = f"appliance-test-{secrets.token_hex(4)}:"
    try:
        yield {"url": REDIS_URL, "prefix": prefix}
    finally:
        for key in client.scan_iter(match=f"*{prefix}*", count=1000):
            client.delete(key)
        client.close()


def write_config(data_dir: Path, **sections: dict[str, Any]) -> Path:
    """Write appliance.toml (with the given section overrides) and fresh secrets into data_dir."""
    import tomli_w

    from appliance import secretfile

    data_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = data_dir / "appliance.toml"
    secretfile.write_private(cfg_path, tomli_w.dumps(sections).encode())
    secrets_path = data_dir / "secrets.toml"
    if not secrets_path.exists():
        secretfile.write_secrets(secrets_path, secretfile.generate_secrets())
    return cfg_path


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(**sections) -> a loaded Config in a fresh data dir under tmp_path."""
    from appliance.config import load_config

    counter = {"n": 0}

    def make(**sections: dict[str, Any]):
        counter["n"] += 1
        path = write_config(tmp_path / f"data{counter['n']}", **sections)
        return load_config(path, env={})

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over both database engines."""
    return request.param


@pytest.fixture
def db_config(engine: str, make_config, request: pytest.FixtureRequest):
    """A Config whose database is SQLite in a temp dir or a fresh PostgreSQL database of its own."""
    if engine == "postgresql":
        url = request.getfixturevalue("pg_url")
        return make_config(database={"url": url, "max_connections": 8})
    return make_config()


@pytest.fixture
def db(db_config) -> Iterator[Any]:
    """The database of db_config, migrated and empty, bound to every model."""
    from appliance import db as dbmod

    handle = dbmod.open_database(db_config)
    dbmod.migrate(handle)
    try:
        yield handle
    finally:
        handle.close_all() if hasattr(handle, "close_all") else handle.close()


_BACKEND_COUNTS: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count outcomes of tests that used PostgreSQL or Redis, for the summary below."""
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    for backend, marker in (("PostgreSQL", "postgresql"), ("Redis", "redis")):
        if marker in report.nodeid.lower() or marker in getattr(report, "keywords", {}):
            counts = _BACKEND_COUNTS.setdefault(backend, {})
            counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say plainly how many tests ran against the real PostgreSQL and Redis servers."""
    for backend, url in (("PostgreSQL", PG_URL), ("Redis", REDIS_URL)):
        counts = _BACKEND_COUNTS.get(backend, {})
        shown = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "none ran"
        terminalreporter.write_line(f"{backend} tests ({url.split('@')[-1]}): {shown}")
