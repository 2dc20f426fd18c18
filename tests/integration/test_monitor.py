"""The monitor role as a real process: Prometheus exposition of other processes' metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from tests.procs import free_port, running, start_child, stop, wait_port


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_monitor_exposes_metrics_recorded_by_another_process(make_config, tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(monitor={"port": port})
    metrics_dir = Path(cfg.data_dir) / "metrics"
    metrics_dir.mkdir()
    recorder = textwrap.dedent(
        """
        from prometheus_client import Counter
        Counter("appliance_test_events", "events recorded by a test process").inc(7)
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    subprocess.run([sys.executable, "-c", recorder], env=env, check=True, timeout=30)
    with running(start_child("monitor", Path(cfg.source), log=tmp_path / "monitor.log")) as proc:
        wait_port(port, proc=proc)
        status, body = _get(port, "/metrics")
        assert status == 200
        assert b"appliance_test_events_total 7.0" in body
        status, body = _get(port, "/health/ping")
        assert status == 200 and b'"status":"ok"' in body
        status, body = _get(port, "/nope")
        assert status == 404 and b'"status":"error"' in body
        assert stop(proc) == 0
