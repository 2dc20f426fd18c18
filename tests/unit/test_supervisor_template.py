"""The supervisor's side of the template, on real processes: the request a child command becomes,
ForkedProcess's exit statuses, and the sweep of orphans a subreaper inherits (exited ones reaped, live
untracked ones stopped after a grace)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.supervisor.kinds import child_command
from appliance.supervisor.template import ORPHAN_GRACE, ForkedProcess, Orphans, _children, child_request


def test_a_child_command_becomes_a_request_and_anything_else_is_exec():
    req = child_request(child_command("api", 3, "text"))
    assert req == {"role": "api", "index": 3, "log_format": "text"}
    assert child_request([sys.executable, "standin.py", "idle"]) is None


def test_forked_process_reports_the_exit_status_like_popen():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    proc = ForkedProcess(pid, None)
    assert proc.wait(10) == 7 and proc.poll() == 7
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    proc = ForkedProcess(pid, None)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL


def zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"


def test_orphans_exited_are_reaped_and_live_untracked_ones_are_stopped_after_a_grace():
    others = set(_children())  # whatever else this test process runs is "known": never touched
    done = subprocess.Popen(["true"])
    live = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not zombie(done.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        sweeper = Orphans()
        now = time.monotonic()
        reaped, killed = sweeper.sweep(others, now)
        assert reaped == [done.pid] and killed == []
        assert not Path(f"/proc/{done.pid}").exists()
        assert live.poll() is None  # seen once: it may be a child we are about to learn of
        reaped, killed = sweeper.sweep(others, now + ORPHAN_GRACE)
        assert killed == [live.pid]
        assert live.wait(10) == -signal.SIGKILL
        tracked = subprocess.Popen(["sleep", "30"])
        try:
            sweeper.sweep(others | {tracked.pid}, now)
            assert sweeper.sweep(others | {tracked.pid}, now + 10) == ([], [])
            assert tracked.poll() is None
        finally:
            tracked.kill()
            tracked.wait(10)
    finally:
        for p in (done, live):
            if p.poll() is None:
                p.kill()
