"""The one-file binary: everything bundled, children reuse its unpacked dir, signals and exit codes pass the bootloader."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.frozen import Frozen
from tests.integration.supervised import http_json, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# An operator's API module and task module that import the standard library and bundled packages.
IMPORTS = [
    "asyncio",
    "csv",
    "decimal",
    "email.mime.text",
    "fractions",
    "hashlib",
    "http.client",
    "json",
    "sqlite3",
    "statistics",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
    "concurrent.futures",
    "logging.handlers",
    "urllib.request",
    "falcon",
    "msgspec",
    "orjson",
    "peewee",
    "psycopg2",
    "psutil",
    "cryptography.fernet",
    "bcrypt",
    "jwt",
    "redis",
    "croniter",
]
APP = f"""
import importlib

NAMES = {IMPORTS!r}


class Imports:
    def on_get(self, req, resp):
        resp.media = {{"status": "success", "data": {{n: importlib.import_module(n).__name__ for n in NAMES}}}}


def setup(app, ctx):
    app.add_route("/ops/imports", Imports())
"""
TASK = """
import decimal, statistics
import orjson
from appliance.tasks.registry import task_type


@task_type("mean", description="mean of numbers, with bundled and standard modules")
def mean(ctx, data):
    return {"mean": str(decimal.Decimal(statistics.mean(data["numbers"]))), "dumped": orjson.dumps(data).decode()}
"""


def _login(app: Frozen) -> str:
    status, body = http_json(app.port, "POST", "/auth/login", {"username": "admin", "password": app.password})
    assert status == 200, body
    return body["data"]["access_token"]


def test_version_json_names_the_build(binary, tmp_path):
    app = Frozen(binary, tmp_path)
    result = app.cli("version", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["frozen"] is True and doc["build_date"] and doc["commit"] != "unknown"
    assert doc["python"].startswith("3.") and all(doc["dependencies"].values()), doc["dependencies"]
    assert app.cli("version").stdout.startswith("appliance ")


def test_exit_status_passes_the_bootloader(binary, tmp_path):
    app = Frozen(binary, tmp_path)
    (tmp_path / "bad.toml").write_text("[balancer]\nlisten = 5\n")
    assert app.cli("check", "--config", str(tmp_path / "bad.toml")).returncode == 2
    assert app.cli("run", "--config", str(tmp_path / "bad.toml")).returncode == 2
    assert app.cli("no-such-command").returncode == 2


def test_run_operator_files_children_share_one_unpacked_dir_and_sigterm_leaves_none(binary, tmp_path):
    app = Frozen(binary, tmp_path)
    app.init()
    for name, text in (("apps", APP), ("tasks", TASK)):
        (app.data / name).mkdir()
        (app.data / name / "ops.py").write_text(text)
    app.start(APPLIANCE_API__APPS_DIR=str(app.data / "apps"), APPLIANCE_QUEUE__TASKS_DIR=str(app.data / "tasks"))
    try:
        assert len(app.processes()) >= 6  # supervisor, 2 api, worker, monitor (runs the scheduler), balancer (+ the bootloader)
        assert len(app.bundle_dirs()) == 1, app.bundle_dirs()  # nobody but the first start unpacked
        token = _login(app)
        status, body = http_json(app.port, "GET", "/api/protected", token=token)
        assert status == 200, body
        status, body = http_json(app.port, "GET", "/ops/imports", token=token)
        assert status == 200 and sorted(body["data"]) == sorted(IMPORTS), body
        status, body = http_json(app.port, "POST", "/tasks/submit", {"task_type": "mean", "data": {"numbers": [1, 2, 6]}}, token)
        assert status in (200, 201, 202), body
        task = body["data"]["task_id"]

        def done():
            doc = http_json(app.port, "GET", f"/tasks/status/{task}", token=token)[1]["data"]
            return doc if doc["status"] in ("succeeded", "failed") else None

        doc = wait_until(done, 60)
        assert doc and doc["status"] == "succeeded" and doc["result"]["mean"] == "3", doc
    finally:
        code = app.stop()
    assert code == 0, app.log.read_text()[-3000:]
    assert app.bundle_dirs() == []
    assert app.processes() == []


def test_group_signal_is_delivered_once_and_sighup_reaches_the_supervisor(binary, tmp_path):
    app = Frozen(binary, tmp_path)
    app.init()
    app.start()
    supervisor = int(Path(f"/proc/{app.proc.pid}/task/{app.proc.pid}/children").read_text().split()[0])
    # Out of the bootloader's group: a group signal reaches the supervisor only through the bootloader, once.
    # (Two SIGTERMs in a row often merge in the kernel, so the count below alone would not show it.)
    assert os.getpgid(supervisor) != os.getpgid(app.proc.pid)
    app.signal(signal.SIGHUP)  # to the file's pid: the bootloader forwards it
    app.wait_for("SIGHUP: reloading", timeout=30)
    app.wait_for("reload done", timeout=120)
    os.killpg(app.proc.pid, signal.SIGTERM)  # the whole process group, as a terminal's Ctrl-C or `kill -TERM -PGID`
    assert app.wait(90) == 0
    messages = app.messages()
    assert sum("SIGTERM received" in m for m in messages) == 1, messages
    assert not any("again" in m for m in messages), messages
    assert app.bundle_dirs() == []


def test_sigkill_of_the_file_leaves_a_dir_that_the_next_start_removes(binary, tmp_path):
    app = Frozen(binary, tmp_path)
    app.init()
    app.start()
    left = app.bundle_dirs()
    assert len(left) == 1
    app.signal(signal.SIGKILL)  # the bootloader cannot clean up; the supervisor gets SIGTERM from the kernel and drains
    app.wait(30)
    assert wait_until(lambda: not app.processes(), 90), app.processes()
    assert app.bundle_dirs() == left
    app.start(wait=False)
    app.wait_for("appliance is up", timeout=120, after=1)
    try:
        assert left[0] not in app.bundle_dirs() and len(app.bundle_dirs()) == 1
    finally:
        assert app.stop() == 0
    assert app.bundle_dirs() == []


def test_sd_notify_comes_from_the_supervisor_and_the_watchdog_is_kept(binary, tmp_path):
    app = Frozen(binary, tmp_path)
    app.init()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(1.0)
    # systemd's WATCHDOG_PID is the main PID, i.e. the file's own process: it is only known after the start,
    # so a small wrapper execs the binary with it (exec keeps the pid).
    wrapper = tmp_path / "start.sh"
    wrapper.write_text(f"#!/bin/sh\nWATCHDOG_PID=$$ exec {app.binary} run --config {app.config}\n")
    wrapper.chmod(0o755)
    env = {**app.env, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    import subprocess

    app.proc = subprocess.Popen([str(wrapper)], stdout=open(app.log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    got: list[tuple[int, str]] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not (any("READY=1" in m for _, m in got) and any("WATCHDOG=1" in m for _, m in got)):
            try:
                data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = next(
                (int.from_bytes(d[:4], "little") for lvl, typ, d in anc if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), 0
            )
            got.append((pid, data.decode()))
    finally:
        code = app.stop()
        sock.close()
    assert code == 0
    senders = {pid for pid, _ in got}
    assert any("READY=1" in m for _, m in got) and any("WATCHDOG=1" in m for _, m in got), got
    assert app.proc.pid not in senders  # not the bootloader: NotifyAccess=all in the unit is needed for the binary
    supervisor = senders.pop()
    assert not senders, got  # one process speaks sd_notify: the supervisor
    assert supervisor != app.proc.pid


@pytest.mark.postgres
def test_backup_on_postgresql_runs_the_hosts_pg_dump_from_the_binary(binary, tmp_path, pg_url):
    # pg_dump is another program: it must not get the bootloader's LD_LIBRARY_PATH (our bundled libraries).
    app = Frozen(binary, tmp_path, APPLIANCE_DATABASE__URL=pg_url)
    app.init()
    app.start()
    try:
        result = app.cli("backup", str(tmp_path / "pg.tar.gz"), "--config", str(app.config))
        assert result.returncode == 0, result.stderr
    finally:
        assert app.stop() == 0
    import tarfile

    with tarfile.open(tmp_path / "pg.tar.gz") as tar:
        assert tar.getmember("database.pgdump").size > 0
