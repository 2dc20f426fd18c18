"""`appliance run` refusing a bad config before anything starts, `appliance status` with nothing running,
and the systemd unit checked by systemd-analyze when the machine has it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import write_config
from tests.procs import appliance_cmd, free_port


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(appliance_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_bad_config_exits_non_zero_naming_the_key_before_anything_starts(tmp_path):
    cfg = write_config(tmp_path / "data", api={"workers": -1}, balancer={"listen": f"127.0.0.1:{free_port()}"})
    result = run("run", "--config", str(cfg))
    assert result.returncode == 2
    assert "[api] workers = -1 is invalid" in result.stderr
    assert not (tmp_path / "data" / "run").exists()  # no lock, no sockets, no children
    assert not (tmp_path / "data" / "appliance.db").exists()


def test_status_when_not_running_exits_3(tmp_path):
    cfg = write_config(tmp_path / "data")
    result = run("status", "--config", str(cfg))
    assert result.returncode == 3
    assert "not running" in result.stderr


def test_systemd_unit_prints_a_hardened_unit(tmp_path):
    cfg = write_config(tmp_path / "data")
    result = run("systemd-unit", "--config", str(cfg), "--user", "appliance")
    assert result.returncode == 0, result.stderr
    for line in ("Type=notify", "ExecReload=/bin/sh -c 'kill -HUP $$MAINPID'", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert line in result.stdout.splitlines()
    assert f"ReadWritePaths={(tmp_path / 'data').resolve()}" in result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    cfg = write_config(tmp_path / "data")
    exe = tmp_path / "appliance"  # verify checks that ExecStart's binary exists and is executable
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    result = run("systemd-unit", "--config", str(cfg), "--exec", str(exe))
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "appliance-test.service"
    unit.write_text(result.stdout)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Lines about our unit are problems; systemd may also complain about unrelated units of the host.
    ours = [line for line in (verify.stdout + verify.stderr).splitlines() if unit.name in line]
    assert verify.returncode == 0 and not ours, verify.stdout + verify.stderr
