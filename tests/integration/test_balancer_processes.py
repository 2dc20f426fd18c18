"""[balancer] processes = 2 on one host: two balancer processes accept from the one listening socket the
supervisor owns; kill -9 of one leaves the other serving, SIGHUP replaces them one at a time with zero
failed requests, SIGTERM drains both and exits 0, and `appliance status` lists both."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time

import pytest

from tests.integration.supervised import Appliance, Stream, http_json, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("balancers"), api_workers=2, task_workers=1, balancer={"processes": 2, "access_log": True})
    app.start()
    yield app
    assert app.stop() == 0  # SIGTERM: both balancers drain, everything stops, exit status 0


def fresh_connections(port: int, count: int, threads: int = 8) -> int:
    """`count` GETs, each on a new connection, from `threads` threads; how many answered 200."""
    ok = 0
    lock = threading.Lock()

    def run(n: int) -> None:
        nonlocal ok
        for _ in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/health/ping", headers={"Connection": "close"})
                if conn.getresponse().status == 200:
                    with lock:
                        ok += 1
            finally:
                conn.close()

    workers = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    return ok


def access_pids(app: Appliance) -> set[int]:
    return {e["pid"] for e in app.lines() if e.get("logger") == "appliance.balancer.access" and "pid" in e}


def test_both_balancer_processes_accept_connections(appliance):
    balancers = appliance.pids("balancer")
    assert len(balancers) == 2, appliance.status()["processes"]
    seen: set[int] = set()
    for _ in range(5):  # which process wins an accept is the kernel's choice: a few bounded rounds
        assert fresh_connections(appliance.port, 200) == 200
        seen = wait_until(lambda: set(balancers.values()) <= access_pids(appliance) and access_pids(appliance), 3) or access_pids(appliance)
        if set(balancers.values()) <= seen:
            break
    assert set(balancers.values()) <= seen, (balancers, seen)


def test_status_and_node_table_list_both_balancers(appliance):
    result = appliance.cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(line.startswith("balancer ") for line in result.stdout.splitlines()) == 2, result.stdout

    def balancer_nodes() -> int:
        status, body = http_json(appliance.port, "GET", "/health/nodes")
        return sum(n["role"] == "balancer" for n in body["data"]["nodes"]) if status == 200 else 0

    assert wait_until(lambda: balancer_nodes() >= 2, 10), balancer_nodes()


def test_kill_9_of_one_balancer_leaves_the_other_serving(appliance):
    before = appliance.pids("balancer")
    slot, pid = sorted(before.items())[0]
    with Stream(appliance.port, threads=3) as stream:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        back = wait_until(lambda: appliance.pids("balancer").get(slot) not in (None, pid), 15, step=0.05)
        time.sleep(0.5)
    assert back, "the killed balancer was not restarted"
    # A request in flight inside the killed process dies with it (at most one per client thread); every
    # other request is accepted by the other balancer or waits in the backlog of the socket the supervisor holds.
    assert len(stream.failures) <= len(stream.threads), stream.failures
    assert stream.refused == 0
    assert stream.ok > 20
    assert appliance.pids("balancer")[1 - slot] == before[1 - slot]  # the other one was never touched


def test_sighup_replaces_both_balancers_with_zero_failed_requests(appliance):
    before = appliance.pids("balancer")
    done_before = appliance.count("reload done")
    good = appliance.config.read_text()
    assert "health_interval = 0.5" in good
    appliance.config.write_text(good.replace("health_interval = 0.5", "health_interval = 0.4"))  # a balancer setting
    try:
        with Stream(appliance.port, threads=3) as stream:
            time.sleep(0.3)
            appliance.signal(signal.SIGHUP)
            appliance.wait_for("reload done", timeout=90, after=done_before)
            time.sleep(0.5)
    finally:
        appliance.config.write_text(good)
    assert stream.failures == [], stream.failures
    assert stream.ok > 50
    after = appliance.pids("balancer")
    assert len(after) == 2 and not set(after.values()) & set(before.values()), (before, after)
