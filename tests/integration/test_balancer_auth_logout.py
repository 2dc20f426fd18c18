"""Logout through a real balancer (auth_mode jwt) in front of a real api worker: the token fails AT THE BALANCER within 1 s.

The worker (waitress, ident "appliance") stamps a Server header on its answers;
the balancer's own answers carry none, so a 401 without it came from the token
hook. To be sure the refused request never reached the worker, the worker is
then frozen (SIGSTOP): a request the balancer forwarded would hang, while the
hook's 401 comes at once.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.api_support import PASSWORD, bearer, start_worker, worker_config
from tests.procs import free_port, start_child, stop, wait_port

pytestmark = pytest.mark.timeout(90)


def _from_worker(r: requests.Response) -> bool:
    return "Server" in r.headers


def test_logout_makes_the_token_fail_at_the_balancer_within_1s(tmp_path: Path) -> None:
    port = free_port()
    cfg_path = worker_config(
        tmp_path / "data",
        api={"workers": 1},
        balancer={"listen": f"127.0.0.1:{port}", "auth_mode": "jwt", "health_interval": 0.5},
        monitor={"enabled": False},
        rate_limits={"enabled": False},
    )
    worker = start_worker(cfg_path)
    balancer = None
    try:
        balancer = start_child("balancer", cfg_path, log=tmp_path / "balancer.log")
        wait_port(port, proc=balancer)
        url = f"http://127.0.0.1:{port}"
        s = requests.Session()
        name = "out" + uuid.uuid4().hex[:8]
        r = s.post(url + "/auth/register", json={"username": name, "email": f"{name}@example.com", "password": PASSWORD}, timeout=10)
        assert r.status_code == 200, r.text
        r = s.post(url + "/auth/login", json={"username": name, "password": PASSWORD}, timeout=10)
        assert r.status_code == 200, r.text
        token = r.json()["data"]["access_token"]

        r = s.get(url + "/api/protected", headers=bearer(token), timeout=10)
        assert r.status_code == 200 and _from_worker(r), r.text
        assert r.json()["data"]["user"]["username"] == name

        r = s.post(url + "/auth/logout", headers=bearer(token), timeout=10)
        assert r.status_code == 200 and _from_worker(r), r.text
        logged_out = time.monotonic()

        # Until the balancer's revocation mirror has seen the logout, the worker refuses the token itself.
        refused = None
        while time.monotonic() - logged_out < 3:
            r = s.get(url + "/api/protected", headers=bearer(token), timeout=10)
            assert r.status_code == 401, r.text
            if not _from_worker(r):
                refused = time.monotonic() - logged_out
                break
            time.sleep(0.02)
        assert refused is not None and refused < 1.0, refused
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        body = r.json()
        assert body["status"] == "error" and body["error"]["code"] and body["error"]["request_id"] == r.headers["X-Request-ID"]

        # The worker frozen: the balancer still refuses at once, so the request never went to it.
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = requests.get(url + "/api/protected", headers=bearer(token), timeout=5)
            assert r.status_code == 401 and not _from_worker(r)
            assert time.monotonic() - t0 < 1.0
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
    finally:
        if balancer is not None:
            stop(balancer)
        worker.stop()
