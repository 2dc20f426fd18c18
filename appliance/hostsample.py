"""The monitor's latest sample of this host, shared through one small file that any process can read.

The monitor's sampler (appliance/monitor/sampler.py) writes <data_dir>/run/host-sample.json
after every sample: the host (cpu, memory, disk, load) and each process (role,
index, pid, state, restarts, cpu, rss, pss). /health/status and /health/nodes read
it, so they show what the status page shows instead of sampling on their own
(a worker's psutil.cpu_percent(None) measures only the time since its own last
call). Written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

FILE = "host-sample.json"


def path(cfg: Any) -> Any:
    return cfg.path("run") / FILE


def write(cfg: Any, sample: dict[str, Any]) -> None:
    """Publish `sample` (JSON-able, with "t" the unix time it was taken)."""
    target = path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(sample, separators=(",", ":"), default=str))
    os.replace(tmp, target)


def read(cfg: Any, max_age: float, now: float | None = None) -> dict[str, Any] | None:
    """The latest sample when it is at most `max_age` seconds old, else None (no monitor, or it stopped)."""
    with contextlib.suppress(OSError, ValueError):
        sample = json.loads(path(cfg).read_text())
        age = (time.time() if now is None else now) - float(sample.get("t", 0))
        if isinstance(sample, dict) and -5 <= age <= max_age:
            return sample
    return None
