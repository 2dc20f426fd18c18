"""Running the one-file binary in a temp dir of its own: init, run, signals, the admin's password."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.procs import free_range


class Frozen:
    """dist/appliance with its data dir, its own TMPDIR (to see the unpacked dirs) and a free balancer port (the internal ones are the kernel's)."""

    def __init__(self, binary: Path, tmp: Path, **extra_env: str):
        self.binary, self.tmp = binary, tmp
        self.data = tmp / "data"
        self.tmpdir = tmp / "tmpdir"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        base = free_range(1)
        self.port = base
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "_PYI_", "NOTIFY_", "WATCHDOG_")) and k != "PYTHONPATH"
        }
        self.env.update(
            TMPDIR=str(self.tmpdir),
            APPLIANCE_BALANCER__LISTEN=f"127.0.0.1:{base}",
            APPLIANCE_API__WORKERS="2",
            APPLIANCE_QUEUE__WORKERS="1",
            APPLIANCE_AUTH__BCRYPT_ROUNDS="10",
            **extra_env,
        )
        self.log = tmp / "run.log"
        self.proc: subprocess.Popen | None = None
        self.password = ""

    @property
    def config(self) -> Path:
        return self.data / "appliance.toml"

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.binary), *args], input=stdin, capture_output=True, text=True, env={**self.env, **env}, timeout=timeout, cwd=self.tmp
        )

    def init(self) -> str:
        result = self.cli("init", "--data-dir", str(self.data))
        assert result.returncode == 0, result.stderr
        self.password = re.search(r"with password: (\S+)", result.stdout).group(1)
        return self.password

    def start(self, wait: bool = True, new_session: bool = True, **env: str) -> Frozen:
        self.proc = subprocess.Popen(
            [str(self.binary), "run", "--config", str(self.config)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env={**self.env, **env},
            start_new_session=new_session,
            cwd=self.tmp,
        )
        if wait:
            self.wait_for("appliance is up", timeout=120)
        return self

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def messages(self) -> list[str]:
        return [e.get("message", "") for e in self.lines() if e.get("role") == "supervisor"]

    def wait_for(self, text: str, timeout: float = 60, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages() if text in m]
            if len(found) > after:
                return found[after]
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no supervisor line with {text!r}; log tail:\n{self.log.read_text()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return self.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.wait(10)

    def bundle_dirs(self) -> list[Path]:
        return sorted(self.tmpdir.glob("_MEI*"))

    def processes(self) -> list[int]:
        """Every live process started from the binary with this data dir's env (supervisor and children)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "exe") == str(self.binary) and f"TMPDIR={self.tmpdir}".encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
        return pids
