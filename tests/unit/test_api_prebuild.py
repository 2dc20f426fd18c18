"""The app the template builds once (app.prebuild) and each api worker adopts with its own database and index."""

from __future__ import annotations

import os
import threading

from falcon import testing
from playhouse.pool import PooledDatabase

from appliance.api import app as appmod
from appliance.db.models import database
from tests.api_support import AUTH, bearer, user_token


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_prebuild_opens_no_thread_file_or_socket(make_config):
    cfg = make_config(auth=AUTH)
    threads, fds = set(threading.enumerate()), _fds()
    appmod.prebuild(cfg)
    try:
        assert set(threading.enumerate()) == threads
        assert _fds() == fds
    finally:
        appmod._prebuilt = None


def test_a_worker_adopts_the_app_built_from_its_config_once(make_config, db_config, db):
    bound = database.obj
    database.initialize(None)  # as in the template: no database opened yet
    try:
        appmod.prebuild(db_config)
    finally:
        database.initialize(bound)
    try:
        assert appmod.adopt_prebuilt(make_config(auth=AUTH), 1, db) is None  # another config (a SIGHUP's): build your own
        app = appmod.adopt_prebuilt(db_config, 1, db)
    finally:
        appmod._prebuilt = None
    assert app is not None and app.ctx.db is db and app.ctx.index == 1 and app.ctx.node_id.endswith(":api:1")
    assert appmod.adopt_prebuilt(db_config, 1, db) is None  # taken: a second call builds its own
    client = testing.TestClient(app)
    assert client.simulate_get("/health/ping").json["node_id"] == app.ctx.node_id
    token = user_token(client, "prebuilt-user")
    for _ in range(3):
        assert client.simulate_get("/api/protected", headers=bearer(token)).status_code == 200
    if isinstance(db, PooledDatabase):  # the database middleware returned each request's connection to the pool
        assert not db._in_use
