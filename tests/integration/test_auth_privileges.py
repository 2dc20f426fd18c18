"""Every privilege change revokes the user's tokens, whoever makes it: here the real CLI
(`appliance user set-role / disable / enable`) against a real api worker that checks tokens
through its polling revocation mirror, on both engines."""

from __future__ import annotations

import os
import secrets
import subprocess

from tests.api_support import PASSWORD, bearer, start_worker, worker_config
from tests.integration.supervised import wait_until
from tests.procs import appliance_cmd


def _cli(cfg_path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    r = subprocess.run(appliance_cmd(*args, "--config", str(cfg_path)), input=stdin, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _login(worker, name: str) -> str:
    r = worker.post("/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r.json()["data"]["access_token"]


def _refused(worker, token: str) -> bool:
    r = worker.get("/api/protected", headers=bearer(token))
    return r.status_code == 401 and r.json()["error"]["code"] == "token_revoked"


def test_cli_role_and_active_changes_revoke_tokens_at_a_running_worker(tmp_path, engine, request) -> None:
    pg_url = request.getfixturevalue("pg_url") if engine == "postgresql" else None
    cfg_path = worker_config(tmp_path / "data", pg_url=pg_url)
    _cli(cfg_path, "migrate")
    name = f"carol{secrets.token_hex(3)}"
    _cli(cfg_path, "user", "create", name, "--password-stdin", stdin=PASSWORD + "\n")
    worker = start_worker(cfg_path)
    try:
        user_token = _login(worker, name)
        assert worker.get("/api/users", headers=bearer(user_token)).status_code == 403

        out = _cli(cfg_path, "user", "set-role", name, "admin").stdout
        assert "tokens are revoked" in out
        assert wait_until(lambda: _refused(worker, user_token), 10), "a promoted user's old token must die"
        admin_token = _login(worker, name)
        assert worker.get("/api/users", headers=bearer(admin_token)).status_code == 200

        _cli(cfg_path, "user", "set-role", name, "user")
        assert wait_until(lambda: _refused(worker, admin_token), 10), "a demoted admin keeps no admin token"
        user_token = _login(worker, name)

        _cli(cfg_path, "user", "disable", name)
        assert wait_until(lambda: _refused(worker, user_token), 10)
        r = worker.post("/auth/login", json={"username": name, "password": PASSWORD})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_credentials"

        _cli(cfg_path, "user", "enable", name)
        _login(worker, name)
        assert "already" in _cli(cfg_path, "user", "enable", name).stdout  # no change, nothing revoked
    finally:
        worker.stop()
