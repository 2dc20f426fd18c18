"""The command line as a user runs it: real processes, a real data dir."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.procs import appliance_cmd


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    full_env.update(env or {})
    return subprocess.run(appliance_cmd(*args), input=stdin, capture_output=True, text=True, timeout=60, env=full_env)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "data"
    r = run("init", "--data-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert "created admin user 'admin' with password: " in r.stdout
    return d


def test_init_writes_private_files(data_dir: Path) -> None:
    for name in ("appliance.toml", "secrets.toml"):
        mode = stat.S_IMODE((data_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    secrets = (data_dir / "secrets.toml").read_text()
    assert "jwt_secret" in secrets and "identity_key" in secrets


def test_second_init_refuses_without_force(data_dir: Path) -> None:
    before = (data_dir / "secrets.toml").read_text()
    r = run("init", "--data-dir", str(data_dir))
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert (data_dir / "secrets.toml").read_text() == before


def test_check_accepts_the_generated_config(data_dir: Path) -> None:
    r = run("check", "--config", str(data_dir / "appliance.toml"))
    assert r.returncode == 0, r.stderr
    assert "configuration is valid" in r.stdout


def test_user_create_with_password_stdin_then_list(data_dir: Path) -> None:
    cfg = str(data_dir / "appliance.toml")
    r = run("user", "create", "alice", "--admin", "--password-stdin", "--config", cfg, stdin="Alice-pass-123\n")
    assert r.returncode == 0, r.stderr
    assert "password" not in r.stdout.lower().replace("password-stdin", "")
    r = run("user", "list", "--config", cfg)
    line = next(ln for ln in r.stdout.splitlines() if " alice " in ln)
    assert " admin " in line


def test_user_create_generates_a_password_once(data_dir: Path) -> None:
    cfg = str(data_dir / "appliance.toml")
    r = run("--config", cfg, "user", "create", "bob", "--email", "bob@example.com")
    assert r.returncode == 0, r.stderr
    assert "password: " in r.stdout


def test_user_errors_name_the_problem(data_dir: Path) -> None:
    cfg = str(data_dir / "appliance.toml")
    r = run("user", "create", "x", "--password-stdin", "--config", cfg, stdin="Strong-pass-1\n")
    assert r.returncode == 2 and "username" in r.stderr
    r = run("user", "create", "weakling", "--password-stdin", "--config", cfg, stdin="short\n")
    assert r.returncode == 2 and "at least" in r.stderr
    r = run("user", "set-role", "nobody", "admin", "--config", cfg)
    assert r.returncode == 2 and "no user named 'nobody'" in r.stderr


def test_set_role_and_disable(data_dir: Path) -> None:
    cfg = str(data_dir / "appliance.toml")
    run("user", "create", "carol", "--password-stdin", "--config", cfg, stdin="Carol-pass-123\n")
    assert run("user", "set-role", "carol", "admin", "--config", cfg).returncode == 0
    assert run("user", "disable", "carol", "--config", cfg).returncode == 0
    line = next(ln for ln in run("user", "list", "--config", cfg).stdout.splitlines() if " carol " in ln)
    assert " admin " in line and " no " in line


def test_migrate_twice_says_nothing_to_do(data_dir: Path) -> None:
    r = run("migrate", "--config", str(data_dir / "appliance.toml"))
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout


def test_bad_config_is_refused_naming_the_key(tmp_path: Path, data_dir: Path) -> None:
    bad = tmp_path / "appliance.toml"
    bad.write_text('[api]\nworkers = "many"\nworkerz = 1\n')
    (tmp_path / "secrets.toml").write_text((data_dir / "secrets.toml").read_text())
    r = run("check", "--config", str(bad))
    assert r.returncode == 2
    assert "[api] workers = 'many'" in r.stderr and "unknown key 'workerz'" in r.stderr


def test_environment_override(data_dir: Path) -> None:
    r = run("check", "--config", str(data_dir / "appliance.toml"), env={"APPLIANCE_API__WORKERS": "3"})
    assert r.returncode == 0, r.stderr
    assert "api workers: 3" in r.stdout


def test_config_from_environment_variable(data_dir: Path) -> None:
    r = run("check", env={"APPLIANCE_CONFIG": str(data_dir / "appliance.toml")})
    assert r.returncode == 0, r.stderr


def test_version_and_help() -> None:
    assert run("version").stdout.startswith("appliance ")
    for args in (["--help"], ["init", "--help"], ["user", "create", "--help"], ["check", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_migrate_refuses_user_names_that_clash_ignoring_case(tmp_path: Path) -> None:
    from appliance import db
    from appliance.config import load_config
    from appliance.db.models import User
    from tests.conftest import write_config

    cfg_path = write_config(tmp_path / "clash")
    handle = db.open_database(load_config(cfg_path, env={}))
    db.migrations.migrate(handle, target=2)  # a database from before names were unique ignoring case
    first = User.create(username="Dana", email="d1@example.com", password_hash="x").id
    second = User.create(username="dana", email="d2@example.com", password_hash="x").id
    handle.close()
    r = run("migrate", "--config", str(cfg_path))
    assert r.returncode == 1
    assert f"'Dana' (id {first})" in r.stderr and f"'dana' (id {second})" in r.stderr and "rename" in r.stderr
