"""The monitor role as a real process: Prometheus exposition of other processes' metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from appliance import identity
from tests.procs import free_port, running, start_child, stop, wait_port


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {}), timeout=5) as r:
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
        # Through the balancer (X-Real-IP set) only an admin's signed identity is served.
        status, body = _get(port, "/metrics", {"X-Real-IP": "203.0.113.9"})
        assert status == 401 and b"missing_token" in body
        key = identity.key_bytes(cfg.secrets.identity_key)
        user = {"sub": "2", "usr": "u", "role": "user", "jti": "j", "fam": "f", "gen": 0, "exp": 4e9}
        status, _ = _get(port, "/metrics", {"X-Real-IP": "203.0.113.9", identity.HEADER: identity.sign(user, key)})
        assert status == 403
        status, _ = _get(port, "/metrics", {"X-Real-IP": "203.0.113.9", identity.HEADER: identity.sign(user, b"forged" * 8)})
        assert status == 401
        admin = {**user, "role": "admin"}
        status, body = _get(port, "/metrics", {"X-Real-IP": "203.0.113.9", identity.HEADER: identity.sign(admin, key)})
        assert status == 200 and b"appliance_test_events_total 7.0" in body
        status, body = _get(port, "/health/ping")
        assert status == 200 and b'"status":"ok"' in body
        status, body = _get(port, "/nope")
        assert status == 404 and b'"status":"error"' in body
        assert stop(proc) == 0
