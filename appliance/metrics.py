"""The one metrics mechanism: prometheus_client in multiprocess mode, files in the data dir.

Every process records into mmap'd files under <data_dir>/metrics (cheap for the
recorder, readable by any process). /api/metrics, /health/nodes, /metrics and
the status page read them through `collect()`; none keeps its own copy.

`prepare(cfg)` must run before prometheus_client is imported in a process (it
sets PROMETHEUS_MULTIPROC_DIR); the supervisor empties the directory at start
and removes the files of dead pids (`mark_dead`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(cfg: Any) -> Path:
    return cfg.path("metrics")


def prepare(cfg: Any, reset: bool = False) -> Path:
    """Point this process (and its children) at the shared metrics directory."""
    path = metrics_dir(cfg)
    if reset and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    return path


def registry() -> Any:
    """A registry that reads every process's metrics files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg)
    return reg


def collect() -> list[Any]:
    """Every metric family, aggregated over all processes."""
    return list(registry().collect())


def exposition() -> bytes:
    """Prometheus text format of everything (for GET /metrics)."""
    from prometheus_client import generate_latest

    return generate_latest(registry())


def mark_dead(pid: int) -> None:
    """Forget a dead process's live gauges (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
