"""[balancer] processes = 2 on one host: two balancer processes accept from the one listening socket the
supervisor owns; a per-user rate limit holds for the host (no Redis: the shared bucket file); kill -9 of
one leaves the other serving, SIGHUP replaces them one at a time with zero failed requests, SIGTERM drains
both and exits 0, /metrics sums both, and `appliance status` lists both."""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
import urllib.request

import pytest

from tests.integration.supervised import Appliance, Stream, http_json, wait_until
from tests.integration.test_status_page import Browser

pytestmark = pytest.mark.slow


PASSWORD = "Processes-test-pw-1"
LIMITED = "/api/protected"
BURST = 99  # with 1/m nothing measurable drains during the test: the host admits burst + 1 = 100
ZONES = [
    {"name": "login", "prefixes": ["/auth/login"], "methods": ["POST"], "key": "address", "rate": "5/m", "burst": 5},
    {"name": "api", "prefixes": [LIMITED], "key": "user", "rate": "1/m", "burst": BURST},
]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    app = Appliance(
        tmp_path_factory.mktemp("balancers"),
        api_workers=2,
        task_workers=1,
        monitor=True,
        balancer={"processes": 2, "access_log": True},
        rate_limits={"zones": ZONES},
    )
    app.start()
    for name, role in (("alice", []), ("root", ["--admin"])):
        made = app.cli("user", "create", name, *role, "--password-stdin", stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
    yield app
    assert app.stop() == 0  # SIGTERM: both balancers drain, everything stops, exit status 0


def fresh_connections(port: int, count: int, threads: int = 8, path: str = "/health/ping", token: str | None = None) -> dict[int, int]:
    """`count` GETs of `path`, each on a new connection, from `threads` threads; status -> how many."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    headers = {"Connection": "close", **({"Authorization": f"Bearer {token}"} if token else {})}

    def run(n: int) -> None:
        for _ in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                with lock:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
            finally:
                conn.close()

    workers = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    return statuses


def access_pids(app: Appliance, path: str = "/health/ping") -> set[int]:
    return {e["pid"] for e in app.lines() if e.get("logger") == "appliance.balancer.access" and e.get("path") == path and "pid" in e}


def test_both_balancer_processes_accept_connections(appliance):
    balancers = appliance.pids("balancer")
    assert len(balancers) == 2, appliance.status()["processes"]
    seen: set[int] = set()
    for _ in range(5):  # which process wins an accept is the kernel's choice: a few bounded rounds
        assert fresh_connections(appliance.port, 200) == {200: 200}
        seen = wait_until(lambda: set(balancers.values()) <= access_pids(appliance) and access_pids(appliance), 3) or access_pids(appliance)
        if set(balancers.values()) <= seen:
            break
    assert set(balancers.values()) <= seen, (balancers, seen)


def test_a_per_user_limit_holds_for_the_host_not_per_process(appliance):
    status, body = http_json(appliance.port, "POST", "/auth/login", {"username": "alice", "password": PASSWORD})
    assert status == 200, body
    token = body["data"]["access_token"]
    statuses = fresh_connections(appliance.port, 400, token=token, path=LIMITED)
    assert set(statuses) <= {200, 429}, statuses
    # Within 5 % of burst + 1 for the host; two per-process buckets would admit twice that.
    assert BURST + 1 <= statuses[200] <= (BURST + 1) * 1.05, statuses
    # ...and both processes took part: each refused or admitted some of them.
    balancers = set(appliance.pids("balancer").values())
    assert wait_until(lambda: balancers <= access_pids(appliance, LIMITED), 5), (balancers, access_pids(appliance, LIMITED))


def requests_total(app: Appliance, status: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.monitor_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    series = f'appliance_balancer_requests_total{{status="{status}"}} '
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series)), 0.0)


def test_metrics_sum_the_counts_of_both_processes(appliance):
    before = requests_total(appliance, 200)
    assert fresh_connections(appliance.port, 320, path="/api/status") == {200: 320}
    # Both processes answered some of them, and /metrics counts all of them (each flushes once a second).
    balancers = set(appliance.pids("balancer").values())
    assert wait_until(lambda: balancers <= access_pids(appliance, "/api/status"), 5), access_pids(appliance, "/api/status")
    assert wait_until(lambda: requests_total(appliance, 200) >= before + 320, 10), (before, requests_total(appliance, 200))


def test_status_and_node_table_list_both_balancers(appliance):
    result = appliance.cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(line.startswith("balancer ") for line in result.stdout.splitlines()) == 2, result.stdout

    def balancer_nodes() -> int:
        status, body = http_json(appliance.port, "GET", "/health/nodes")
        return sum(n["role"] == "balancer" for n in body["data"]["nodes"]) if status == 200 else 0

    assert wait_until(lambda: balancer_nodes() >= 2, 10), balancer_nodes()

    browser = Browser(appliance.port)
    assert browser.login("root", PASSWORD)[0] == 303

    def page_balancers() -> set[int]:
        status, _, text = browser.request("GET", "/status/api/snapshot")
        return {int(pid) for pid in re.findall(r'"role":"balancer","index":\d+,"pid":(\d+)', text)} if status == 200 else set()

    live = set(appliance.pids("balancer").values())
    assert wait_until(lambda: page_balancers() == live, 20), (live, browser.request("GET", "/status/api/snapshot")[2][:3000])


def status_api_requests(app: Appliance) -> int:
    """The api upstreams' request counts summed, as `appliance status` prints them."""
    result = app.cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    return sum(int(m) for m in re.findall(r"^  api .*requests (\d+),", result.stdout, re.M))


def test_status_counts_the_requests_of_both_balancer_processes(appliance):
    before = status_api_requests(appliance)
    assert fresh_connections(appliance.port, 320, path="/api/status") == {200: 320}
    balancers = set(appliance.pids("balancer").values())
    assert wait_until(lambda: balancers <= access_pids(appliance, "/api/status"), 5)  # both proxied some
    # Each process writes its own state file (at most every 0.5 s); status adds them up.
    assert wait_until(lambda: status_api_requests(appliance) >= before + 320, 10), (before, appliance.cli("status").stdout)


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
    # The replacements alternate indexes (each its own state file); a stopped one's file goes with it,
    # so drains and `appliance status` read only what the live processes wrote.
    indexes = {r["index"] for r in appliance.status()["processes"] if r["role"] == "balancer" and r["pid"]}
    files = {p.name for p in (appliance.data / "run").glob("balancer-state*.json")}
    assert len(files) == len(indexes) == 2, (files, indexes)
