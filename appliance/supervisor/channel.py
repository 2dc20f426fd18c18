"""The control channel to the balancer: run/upstreams.json out, run/balancer-state.json in.

The supervisor writes the list of local upstreams (api workers, monitor) with
a version number, atomically (temporary file + os.replace), and sends SIGUSR1
to the balancer, which re-reads it. The balancer writes what it applied and
how busy each upstream is to balancer-state.json; the supervisor reads that to
know when a draining api worker has no request in flight any more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.contract import BALANCER_STATE_FILE as STATE
from appliance.contract import RATE_LIMIT_FILE, balancer_state_file
from appliance.contract import UPSTREAMS_FILE as UPSTREAMS

MAX_BALANCER_INDEX = 128  # [balancer] processes le=64; a replacement alternates between slot and slot + count


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def upstreams_document(version: int, groups: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """{"version", "groups": {group: [{"address", "weight", "state"}]}} from (address, state) pairs."""
    return {
        "version": version,
        "groups": {name: [{"address": a, "weight": 1, "state": s} for a, s in members] for name, members in groups.items()},
    }


@dataclass(frozen=True)
class BalancerState:
    version: int
    upstreams: dict[str, list[dict[str, Any]]]
    mtime: float
    pid: int = 0  # the balancer process that wrote it

    def entry(self, group: str, address: str) -> dict[str, Any] | None:
        for item in self.upstreams.get(group, []):
            if isinstance(item, dict) and item.get("address") == address:
                return item
        return None

    def idle(self, group: str, address: str, version: int) -> bool:
        """True once the balancer applied `version` and has no request in flight to `address`."""
        if self.version < version:
            return False
        item = self.entry(group, address)
        return item is None or int(item.get("active") or 0) == 0


_SUMMED = ("active", "requests", "failures")


def _count(value: Any) -> int:
    """A count from a state file: a non-negative int, 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Channel:
    """Reads and writes the two files in <data_dir>/run."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.version = 0
        self._last: dict[str, list[tuple[str, str]]] | None = None

    @property
    def upstreams_path(self) -> Path:
        return self.run_dir / UPSTREAMS

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE

    def state_path_for(self, index: int) -> Path:
        """The state file of balancer process `index` (each of [balancer] processes writes its own)."""
        return self.run_dir / balancer_state_file(index)

    def reset(self) -> None:
        """Forget the files of an earlier run so that nothing stale is read."""
        # The balancers' shared rate-limit buckets hold monotonic times of this boot and run: start afresh.
        stale = (self.upstreams_path, self.run_dir / RATE_LIMIT_FILE, *(self.state_path_for(i) for i in range(MAX_BALANCER_INDEX)))
        for path in stale:
            path.unlink(missing_ok=True)

    def publish(self, groups: dict[str, list[tuple[str, str]]]) -> bool:
        """Write the upstreams when they changed; True when a new version was written."""
        if groups == self._last:
            return False
        self.version += 1
        self._last = {k: list(v) for k, v in groups.items()}
        write_atomic(self.upstreams_path, json.dumps(upstreams_document(self.version, groups), indent=1).encode())
        return True

    def combined_state(self, live: Collection[int] | None = None) -> BalancerState | None:
        """What every balancer process reported, as one state (for `appliance status`).

        Each upstream is listed as the newest file has it, with in flight, requests and failures
        summed over the processes: each of [balancer] processes counts only what it proxied. With
        `live`, only files written by those pids count (one left by a process since stopped or
        restarted would otherwise add its last figures forever).
        """
        states = [s for s in (self.read_state(i) for i in range(MAX_BALANCER_INDEX)) if s is not None]
        if live is not None:
            states = [s for s in states if s.pid in live]
        if not states:
            return None
        states.sort(key=lambda s: s.mtime)
        newest = states[-1]
        sums: dict[tuple[str, Any], dict[str, int]] = {}
        for state in states:
            for group, items in state.upstreams.items():
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, dict):
                        total = sums.setdefault((group, item.get("address")), dict.fromkeys(_SUMMED, 0))
                        for key in _SUMMED:
                            total[key] += _count(item.get(key))
        upstreams = {
            group: [{**item, **sums[(group, item.get("address"))]} for item in items if isinstance(item, dict)]
            for group, items in newest.upstreams.items()
            if isinstance(items, list)
        }
        return BalancerState(version=min(s.version for s in states), upstreams=upstreams, mtime=newest.mtime, pid=newest.pid)

    def read_state(self, index: int = 0) -> BalancerState | None:
        """Balancer `index`'s last state file, or None when absent or unreadable (it is replaced atomically)."""
        path = self.state_path_for(index)
        try:
            st = path.stat()
            raw = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        ups = raw.get("upstreams")
        try:
            version = int(raw.get("version") or 0)
        except (TypeError, ValueError):
            version = 0
        return BalancerState(version=version, upstreams=ups if isinstance(ups, dict) else {}, mtime=st.st_mtime, pid=_count(raw.get("pid")))
