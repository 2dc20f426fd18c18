"""`appliance backup` / `appliance restore` against a real running appliance, on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import secrets
import sqlite3
import stat
import tarfile
from pathlib import Path

import pytest

from tests.integration.supervised import Appliance, http_json, wait_until

PASSWORD = "a-long-password-1"


def _appliance(tmp: Path, engine: str, request: pytest.FixtureRequest) -> Appliance:
    sections = {}
    if engine == "postgresql":
        sections["database"] = {"url": request.getfixturevalue("pg_url"), "max_connections": 6}
    return Appliance(tmp, api_workers=1, task_workers=1, **sections)


def _login(app: Appliance, name: str) -> str:
    status, body = http_json(app.port, "POST", "/auth/login", {"username": name, "password": PASSWORD})
    assert status == 200, body
    return body["data"]["access_token"]


def _user(app: Appliance, name: str) -> None:
    result = app.cli("user", "create", name, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr


def _users(app: Appliance) -> set[str]:
    """The user names `appliance user list` shows (its second column)."""
    result = app.cli("user", "list")
    assert result.returncode == 0, result.stderr
    return {line.split()[1] for line in result.stdout.splitlines()[1:] if len(line.split()) > 1}


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow
def test_round_trip_while_running(tmp_path, engine, request):
    # Names of this test's own, so an assertion on the user list can only match this test's users.
    bob, carol = f"bob_{secrets.token_hex(3)}", f"carol_{secrets.token_hex(3)}"
    app = _appliance(tmp_path, engine, request).start()
    try:
        _user(app, bob)
        token = _login(app, bob)
        status, body = http_json(app.port, "POST", "/tasks/submit", {"task_type": "sample", "data": {"n": 42}}, token)
        assert status in (200, 201, 202), body
        task_id = body["data"]["task_id"]
        assert wait_until(
            lambda: http_json(app.port, "GET", f"/tasks/status/{task_id}", token=token)[1]["data"]["status"] == "succeeded", 60
        )
        upload = app.data / "uploads" / "u1" / "rows.csv"
        upload.parent.mkdir(parents=True)
        upload.write_text("a,b\n1,2\n")

        archive = tmp_path / "backups" / "one.tar.gz"
        result = app.cli("backup", str(archive))  # while it runs
        assert result.returncode == 0, result.stderr
        assert "backup complete" in result.stderr
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600
        files = _members(archive)
        manifest = json.loads(files["manifest.json"])
        assert manifest["engine"] == engine and manifest["format"] == "appliance-backup"
        assert "secrets.toml" not in files and "appliance.toml" in files and "uploads/u1/rows.csv" in files
        assert ("database.pgdump" in files) == (engine == "postgresql")
        assert ("appliance.db" in files) == (engine == "sqlite")
        assert "queue.db" in files and not any(name.startswith(("run/", "metrics/")) for name in files)

        refused = app.cli("restore", str(archive))
        assert refused.returncode == 1 and "while the appliance runs" in refused.stderr, refused.stderr
        assert (app.data / "appliance.toml").exists()
        _user(app, carol)  # after the backup: gone once it is restored
    finally:
        assert app.stop() == 0

    result = app.cli("restore", str(archive))
    assert result.returncode == 0, result.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("data.before-restore-")]
    assert len(kept) == 1, list(tmp_path.iterdir())
    assert (kept[0] / "appliance.toml").exists() and (kept[0] / "secrets.toml").exists()
    if engine == "postgresql":
        assert (kept[0] / "database.pgdump").stat().st_size > 0  # the replaced database is kept too
    users = _users(app)
    assert bob in users and carol not in users, users
    assert (app.data / "uploads" / "u1" / "rows.csv").read_text() == "a,b\n1,2\n"

    app.start(wait=False)  # its log goes on after the first run's lines
    app.wait_for("appliance is up", timeout=90, after=1)
    try:
        token = _login(app, bob)
        status, body = http_json(app.port, "GET", f"/tasks/status/{task_id}", token=token)
        assert status == 200 and body["data"]["status"] == "succeeded", body
    finally:
        assert app.stop() == 0


@pytest.mark.slow
def test_restore_into_a_fresh_data_dir(tmp_path):
    app = Appliance(tmp_path, api_workers=1, task_workers=1)
    assert app.cli("migrate").returncode == 0
    _user(app, "dora")
    # An operator's own SQLite file in WAL mode, its last row only in the WAL (the writer is still open):
    # a plain file copy would lose it; the online backup API does not.
    (app.data / "ops").mkdir()
    writer = sqlite3.connect(app.data / "ops" / "ops.db")
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (v TEXT)")
    writer.execute("INSERT INTO t VALUES ('only in the wal')")
    writer.commit()
    archive = tmp_path / "b.tar.gz"
    try:
        assert (app.data / "ops" / "ops.db-wal").stat().st_size > 0
        assert app.cli("backup", str(archive), "--with-secrets", "--quiet").returncode == 0
    finally:
        writer.close()
    assert "secrets.toml" in _members(archive)
    fresh = tmp_path / "elsewhere" / "data"
    result = app.cli("restore", str(archive), "--data-dir", str(fresh))
    assert result.returncode == 0, result.stderr
    assert (fresh / "secrets.toml").read_bytes() == (app.data / "secrets.toml").read_bytes()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    listed = app.cli("user", "list", "--config", str(fresh / "appliance.toml"))
    assert "dora" in listed.stdout, listed.stderr
    restored = sqlite3.connect(fresh / "ops" / "ops.db")
    try:
        assert restored.execute("SELECT v FROM t").fetchall() == [("only in the wal",)]
    finally:
        restored.close()


def _rewrite(archive: Path, target: Path, change) -> Path:
    files = _members(archive)
    change(files)
    with tarfile.open(target, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return target


def test_damaged_and_foreign_archives_are_refused_and_nothing_changes(tmp_path):
    app = Appliance(tmp_path, api_workers=1, task_workers=1)
    assert app.cli("migrate").returncode == 0
    _user(app, "erin")
    good = tmp_path / "good.tar.gz"
    assert app.cli("backup", str(good), "--quiet").returncode == 0
    before = sorted(p.name for p in tmp_path.iterdir())

    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "flipped.tar.gz").write_bytes(bytes(raw))
    (tmp_path / "truncated.tar.gz").write_bytes(bytes(raw[: len(raw) // 3]))
    (tmp_path / "text.tar.gz").write_text("not an archive")

    def tamper(files):
        files["appliance.toml"] += b"\n# changed\n"

    def foreign(files):
        del files["manifest.json"]

    def extra(files):
        files["run/evil"] = b"x"

    def newer(files):
        doc = json.loads(files["manifest.json"])
        doc["format_version"] = 99
        files["manifest.json"] = json.dumps(doc).encode()

    cases = {
        "flipped.tar.gz": "damaged",
        "truncated.tar.gz": "damaged",
        "text.tar.gz": "damaged or not a tar.gz",
        _rewrite(good, tmp_path / "tampered.tar.gz", tamper).name: "checksum of 'appliance.toml' does not match",
        _rewrite(good, tmp_path / "foreign.tar.gz", foreign).name: "not an appliance backup",
        _rewrite(good, tmp_path / "extra.tar.gz", extra).name: "does not list",
        _rewrite(good, tmp_path / "newer.tar.gz", newer).name: "backup format 99",
    }
    db_bytes = (app.data / "appliance.db").read_bytes()
    for name, problem in cases.items():
        result = app.cli("restore", str(tmp_path / name))
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert problem in result.stderr, (name, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tar.gz")) == sorted(
        n for n in before if not n.endswith(".tar.gz")
    )
    assert (app.data / "appliance.db").read_bytes() == db_bytes
    assert "erin" in _users(app)


def test_a_pg_dump_of_another_major_is_not_used_and_the_message_names_the_package():
    from appliance.backup import BackupError, pg_tool

    with pytest.raises(BackupError, match=r"pg_dump of PostgreSQL 99 .*apt-get install postgresql-client-99"):
        pg_tool("pg_dump", 99)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path, make_config):
    from appliance import backup, db

    cfg = make_config()
    db.migrate(db.open_database(cfg))
    term, pipe = _Terminal(), io.StringIO()
    backup.create(cfg, tmp_path / "t.tar.gz", progress=backup.Progress(term))
    backup.create(cfg, tmp_path / "p.tar.gz", progress=backup.Progress(pipe))
    assert "\r" in term.getvalue() and "100.0%" in term.getvalue()
    assert "\r" not in pipe.getvalue() and "[" not in pipe.getvalue() and "backup complete" in pipe.getvalue()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_restore_run_as_root_gives_the_files_to_the_data_dirs_owner(tmp_path):
    app = Appliance(tmp_path, api_workers=1, task_workers=1)
    assert app.cli("migrate").returncode == 0
    archive = tmp_path / "o.tar.gz"
    assert app.cli("backup", str(archive), "--quiet").returncode == 0
    for path in [app.data, *app.data.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)  # the service user's data dir
    result = app.cli("restore", str(archive), "--quiet")
    assert result.returncode == 0, result.stderr
    for path in [app.data, *app.data.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path
