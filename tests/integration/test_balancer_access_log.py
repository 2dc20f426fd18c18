"""The balancer's access lines follow the process's log format, --log-format over [logging] format."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_balancer_proxy import Stack, get
from tests.procs import appliance_cmd, stop, wait_port

pytestmark = pytest.mark.timeout(60)


def _run(s: Stack, *extra: str) -> subprocess.Popen:
    out = open(s.log, "ab")
    proc = subprocess.Popen(
        appliance_cmd("_child", "balancer", "--index", "0", "--config", str(s.config), *extra),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    wait_port(s.port, proc=proc)
    return proc


def _access_lines(log: Path, marker: str) -> list[str]:
    deadline = time.monotonic() + 30  # a bound for the line to reach the log, not a timing claim (5 s ran out at load 12)
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if marker in line]
        if lines:
            return lines
        time.sleep(0.1)
    return []


@pytest.mark.parametrize("flag", ["text", "json"])
def test_access_lines_follow_log_format_flag(tmp_path: Path, flag: str) -> None:
    s = Stack(tmp_path, workers=1)  # the config says [logging] format = "json"
    try:
        s.proc = _run(s, "--log-format", flag)
        rid = f"access-{flag}-1"
        status, _, _ = get(s.client(), "/whoami?x=1", {"X-Request-ID": rid})
        assert status == 200
        lines = _access_lines(s.log, rid)
        assert len(lines) == 1, lines
        line = lines[0]
        if flag == "text":
            assert not line.startswith("{")
            assert f"balancer[{s.proc.pid}] GET /whoami 200 " in line and f"(request {rid})" in line
            assert f"upstream=127.0.0.1:{s.base}" in line
            # the process's other lines are text as well
            assert any("balancer listening" in x and not x.startswith("{") for x in s.log.read_text().splitlines())
        else:
            entry = json.loads(line)
            assert (
                entry["logger"] == "appliance.balancer.access" and entry["status"] == 200 and entry["path"] == "/whoami"
            )  # the path, never the query
    finally:
        if s.proc is not None:
            stop(s.proc)
            s.proc = None
        s.close()
