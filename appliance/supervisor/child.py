"""One child slot and the process filling it, plus small helpers about processes.

A Child is a slot of a kind (api slot 0, worker slot 1, ...) and the process
currently in it: its state (starting, up, draining, stopping, backoff,
failed, stopped), restart history, output relay and heartbeat file. The
arbiter's loop is the only writer; the control thread reads its snapshot.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.supervisor.kinds import Kind
from appliance.supervisor.policy import RestartTracker
from appliance.supervisor.relay import Relay


@dataclass(eq=False)
class Child:
    """One slot of a kind and the process currently filling it."""

    kind: Kind
    slot: int
    index: int
    cfg: Any
    tracker: RestartTracker
    proc: Any = None  # a subprocess.Popen, or a ForkedProcess (template.py) with the same poll/kill/wait/pid/stdout
    relay: Relay | None = None
    state: str = "new"  # starting, up, draining, stopping, backoff, failed, stopped
    pid: int | None = None
    started_at: float = 0.0
    started_wall: float = 0.0
    next_start: float = 0.0
    last_probe: float = 0.0
    restarts: int = 0
    retiring: bool = False
    boot_failure: bool = False
    exit_status: int | None = None
    heartbeat: Path | None = None  # this process's own file: an old and a new process may share an index
    via: str = ""  # how the process was started: "template" (forked from it) or "exec"
    address: str | None = None  # where it listens: the kind's fixed address, or the one it announced
    address_file: Path | None = None  # where it announces it (a kind that listens on a port the kernel picks)

    @property
    def name(self) -> str:
        return f"{self.kind.role}[{self.index}]"

    @property
    def alive(self) -> bool:
        return self.proc is not None

    def last_lines(self, n: int = 10) -> list[str]:
        if self.relay is None:
            return []
        self.relay.join(0.5)  # the last lines of a dead child may still be in the pipe
        return self.relay.last_lines(n)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def catches(pid: int, sig: int) -> bool:
    """True when process `pid` has a handler for `sig` (Linux: SigCgt in /proc/PID/status); False when unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except (OSError, ValueError):
        pass
    return False


def indent(lines: list[str]) -> str:
    return "\n".join("  | " + line for line in lines) if lines else "  (no output)"
