"""The balancer's revocation reader: plain SQL (sqlite3 / psycopg2), the same verdicts as the peewee mirror, on both engines."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

from appliance import revocation
from appliance.revocation_mirror import RevocationMirror, SqlEvents
from appliance.times import utcnow


def test_plain_sql_mirror_reads_every_kind_and_skips_long_expired_events(db, db_config) -> None:
    far = utcnow() + dt.timedelta(days=1)
    revocation.revoke_token("old", 1, utcnow() - dt.timedelta(days=2))  # expired beyond the leeway: not loaded
    revocation.revoke_token("jx", 5, far)
    revocation.revoke_family("fz", 5, far, reason="reuse_detected")
    revocation.revoke_generation(5, 3, far, reason="logout_all")
    source = SqlEvents(db_config)
    mirror = RevocationMirror(leeway=10, source=source)
    peewee_mirror = revocation.RevocationMirror(leeway=10)
    try:
        assert mirror.refresh() == peewee_mirror.refresh() == 3
        cases = [
            {"sub": "5", "jti": "jx", "fam": "f", "gen": 3},
            {"sub": "5", "jti": "j", "fam": "fz", "gen": 3},
            {"sub": "5", "jti": "j", "fam": "f", "gen": 2},
            {"sub": "5", "jti": "j", "fam": "f", "gen": 3},
            {"sub": "1", "jti": "old", "fam": "f", "gen": 0},
        ]
        assert [mirror.is_revoked(c) for c in cases] == ["logout", "reuse_detected", "revoked", None, None]
        assert [peewee_mirror.is_revoked(c) for c in cases] == [mirror.is_revoked(c) for c in cases]
        revocation.revoke_token("late", 5, far)
        assert mirror.refresh() == 1  # only what is new since the last poll
        assert mirror.is_revoked({"sub": "5", "jti": "late"}) == "logout"
        source.reset()  # after a failed poll: a new connection on the next one
        assert mirror.refresh() == 0
    finally:
        source.reset()


def test_the_balancer_with_jwt_mode_imports_neither_peewee_nor_falcon(db, db_config) -> None:
    revocation.revoke_token("jx", 5, utcnow() + dt.timedelta(days=1))
    # What the balancer role runs at start for [balancer] auth_mode = "jwt": its hook and revocation mirror.
    code = (
        "import sys, time\n"
        "from appliance.config import load_config\n"
        "from appliance.balancer.server import Balancer\n"
        f"balancer = Balancer(load_config({db_config.source!r}, env={{}}))\n"
        "hook = balancer._hook()\n"
        "deadline = time.monotonic() + 30\n"
        "while not balancer.mirror.healthy and time.monotonic() < deadline: time.sleep(0.05)\n"
        "assert balancer.mirror.is_revoked({'jti': 'jx'}) == 'logout', 'the mirror did not load the revocation'\n"
        "print(sorted(n for n in ('peewee', 'falcon', 'playhouse', 'appliance.db', 'appliance.api', 'appliance.queue', 'appliance.monitor') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
