"""Issue 16, several hosts: three appliances (host-a/b/c) on one PostgreSQL and one Redis, each in its own
network namespace (tests/cluster/netns.py). Rate limits, revocation, cron slots, /health/nodes and task
recovery are cluster-wide; killing every process of one host loses no task, and the host rejoins.

The figures the issue sets (10/s within 5 %, 1 s, the heartbeat timeout) are asserted here because they are
the behaviour under test (a per-host limit would let three times as many through; a revocation that stays
per host never reaches B), not measures of speed.
"""

from __future__ import annotations

import datetime as dt
import http.client
import secrets
import threading
import time
from typing import Any

import pytest

from tests.cluster.netns import HEARTBEAT_TIMEOUT, PUBLIC_PORT, Cluster, Host, wait_until

pytestmark = pytest.mark.cluster

PASSWORD = "Correct-horse-9"
ROLES = {"api", "balancer", "scheduler", "supervisor", "worker"}


def user_token(cluster: Cluster, on: str = "a") -> tuple[str, str]:
    """(user name, access token) of a fresh user registered and logged in on host `on`."""
    host = cluster.hosts[on]
    name = f"u{secrets.token_hex(4)}"
    status, body = host.request("POST", "/auth/register", {"username": name, "email": f"{name}@example.com", "password": PASSWORD})
    assert status == 200, body
    status, body = host.request("POST", "/auth/login", {"username": name, "password": PASSWORD})
    assert status == 200, body
    return name, body["data"]["access_token"]


def nodes(host: Host) -> list[dict[str, Any]]:
    status, body = host.request("GET", "/health/nodes", timeout=5)
    assert status == 200, body
    return body["data"]["nodes"]


def fresh_hosts(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """host -> roles with a live, fresh heartbeat."""
    out: dict[str, set[str]] = {}
    for n in rows:
        if not n["stale"] and n["status"] == "running":
            out.setdefault(n["host"], set()).add(n["role"])
    return out


def test_every_host_lists_every_process_of_every_host(cluster):
    want = {h.node: ROLES for h in cluster.hosts.values()}
    for host in cluster.hosts.values():
        seen = wait_until(lambda h=host: fresh_hosts(nodes(h)) == want and fresh_hosts(nodes(h)), 30, f"/health/nodes of {host.node}")
        assert seen == want


def test_a_token_from_one_host_is_accepted_on_every_host(cluster):
    name, token = user_token(cluster, on="a")
    for host in cluster.hosts.values():
        status, body = host.request("GET", "/auth/profile", token=token)
        assert status == 200, (host.node, body)
        assert body["data"]["user"]["username"] == name
    # a token signed with other keys is refused everywhere: the hosts share secrets, not an open door
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for host in cluster.hosts.values():
        assert host.request("GET", "/auth/profile", token=forged)[0] == 401


def test_per_user_limit_of_10_per_second_holds_across_the_three_balancers(cluster):
    _, token = user_token(cluster)
    duration, per_host_rate = 8.0, 15.0  # 45 requests/s offered in all, 10/s allowed (burst 5)
    results: dict[str, list[tuple[float, int]]] = {s: [] for s in cluster.hosts}
    errors: list[str] = []
    start = time.monotonic() + 0.2

    def hammer(short: str) -> None:
        host = cluster.hosts[short]
        conn = http.client.HTTPConnection(host.address, PUBLIC_PORT, timeout=10)
        next_at = start
        while next_at < start + duration:
            time.sleep(max(0.0, next_at - time.monotonic()))
            sent = time.monotonic()
            try:
                conn.request("GET", "/api/protected", headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                resp.read()
                results[short].append((sent, resp.status))
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{short}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(host.address, PUBLIC_PORT, timeout=10)
            next_at += 1.0 / per_host_rate
        conn.close()

    threads = [threading.Thread(target=hammer, args=(s,)) for s in cluster.hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    assert not errors, errors[:5]
    every = [r for rs in results.values() for r in rs]
    assert {status for _, status in every} <= {200, 429}, sorted({s for _, s in every})
    window = max(t for t, _ in every) - min(t for t, _ in every)
    allowed = sum(status == 200 for _, status in every)
    expected = 5 + 1 + 10.0 * window  # burst + the first request, then one per 1/10 s
    per_host = {s: sum(st == 200 for _, st in rs) for s, rs in results.items()}
    assert abs(allowed - expected) <= 0.05 * expected, (allowed, expected, per_host)
    # every host both served and refused: one limit for the cluster, not one per host
    for short, rs in results.items():
        statuses = {st for _, st in rs}
        assert statuses == {200, 429}, (short, per_host)


def test_a_logout_on_host_a_fails_the_token_on_b_and_c_within_one_second(cluster):
    _, token = user_token(cluster, on="a")
    a, others = cluster.hosts["a"], [cluster.hosts["b"], cluster.hosts["c"]]
    for host in others:
        assert host.request("GET", "/auth/profile", token=token)[0] == 200
    status, body = a.request("POST", "/auth/logout", token=token)
    assert status == 200, body
    logged_out = time.monotonic()
    refused_after: dict[str, float] = {}
    while len(refused_after) < len(others) and time.monotonic() - logged_out < 5:
        for host in others:
            if host.node not in refused_after:
                status, _ = host.request("GET", "/auth/profile", token=token, timeout=5)
                if status == 401:
                    refused_after[host.node] = time.monotonic() - logged_out
                else:
                    assert status == 200
        time.sleep(0.02)
    assert set(refused_after) == {h.node for h in others}, refused_after
    assert max(refused_after.values()) < 1.0, refused_after
    assert a.request("GET", "/auth/profile", token=token)[0] == 401


def test_a_logout_all_on_host_b_fails_every_token_of_the_user_on_a_and_c_within_one_second(cluster):
    name, first = user_token(cluster, on="a")
    status, body = cluster.hosts["c"].request("POST", "/auth/login", {"username": name, "password": PASSWORD})
    assert status == 200, body
    second = body["data"]["access_token"]  # another device, logged in on another host
    targets = [(cluster.hosts["a"], first), (cluster.hosts["c"], second), (cluster.hosts["a"], second), (cluster.hosts["c"], first)]
    for host, token in targets:
        assert host.request("GET", "/auth/profile", token=token)[0] == 200
    status, body = cluster.hosts["b"].request("POST", "/auth/logout-all", token=first)
    assert status == 200, body
    logged_out = time.monotonic()
    pending = set(range(len(targets)))
    refused_after: dict[int, float] = {}
    while pending and time.monotonic() - logged_out < 5:
        for i in sorted(pending):
            host, token = targets[i]
            status, _ = host.request("GET", "/auth/profile", token=token, timeout=5)
            if status == 401:
                refused_after[i] = time.monotonic() - logged_out
                pending.discard(i)
            else:
                assert status == 200
        time.sleep(0.02)
    assert not pending, refused_after
    assert max(refused_after.values()) < 1.0, refused_after


def test_host_c_forwards_a_route_to_the_other_hosts_balancers(cluster):
    """[balancer] upstreams on host C: /health/ping goes to host A's and host B's public listeners."""
    answered = set()
    for _ in range(10):
        status, body = cluster.hosts["c"].request("GET", "/health/ping")
        assert status == 200, body
        answered.add(body["node_id"].split(":")[0])
    assert answered <= {"host-a", "host-b"} and answered, answered
    assert cluster.hosts["a"].request("GET", "/health/ping")[1]["node_id"].startswith("host-a:")


def runs_and_tasks(cluster: Cluster, schedule_id: int) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    with cluster.sql() as cur:
        cur.execute("SELECT slot, task_id FROM schedule_run WHERE schedule_id = %s ORDER BY slot", (schedule_id,))
        runs = cur.fetchall()
        cur.execute("SELECT id, status FROM task WHERE schedule_id = %s", (schedule_id,))
        tasks = cur.fetchall()
    return runs, tasks


def assert_once_per_slot(runs: list[tuple[Any, Any]], tasks: list[tuple[Any, Any]]) -> None:
    slots = [slot for slot, _ in runs]
    assert len(set(slots)) == len(slots)
    assert sorted(t for _, t in runs) == sorted(t for t, _ in tasks), (runs, tasks)


def test_a_cron_slot_fires_exactly_once_with_three_schedulers(cluster):
    want = {h.node for h in cluster.hosts.values()}
    wait_until(
        lambda: {h for h, roles in fresh_hosts(nodes(cluster.hosts["a"])).items() if "scheduler" in roles} == want, 30, "3 schedulers"
    )
    _, token = user_token(cluster, on="b")
    body = {"task_type": "sample", "schedule": {"type": "cron", "expression": "* * * * *", "timezone": "UTC"}, "data": {"x": 1}}
    status, answer = cluster.hosts["b"].request("POST", "/tasks/schedule", body, token=token)
    assert status == 200, answer
    sid = answer["data"]["schedule_id"]
    # Make the slot of this minute due at once on every host, three times: each time all three
    # schedulers (ticking every second) find it due, and only one may fire it.
    for _ in range(3):
        with cluster.sql() as cur:
            cur.execute(
                "UPDATE schedule SET next_run_at = %s WHERE id = %s",
                (dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=3), sid),
            )
        wait_until(lambda: runs_and_tasks(cluster, sid)[0], 15, "the due slot fires")
        time.sleep(2.5)  # every scheduler ticked at least twice since
    runs, tasks = runs_and_tasks(cluster, sid)
    assert_once_per_slot(runs, tasks)
    assert 1 <= len(runs) <= 2, runs  # one slot, or two when a minute boundary passed meanwhile
    # the next slot, on the clock: fired once too, a minute after the last one
    last = runs[-1][0]
    runs = wait_until(lambda: (r := runs_and_tasks(cluster, sid)[0]) and r[-1][0] > last and r, 75, "the next minute's slot")
    time.sleep(2.5)
    runs, tasks = runs_and_tasks(cluster, sid)
    assert_once_per_slot(runs, tasks)
    assert runs[-1][0] - last == dt.timedelta(minutes=1), runs
    final = wait_until(lambda: (t := runs_and_tasks(cluster, sid)[1]) and all(s == "succeeded" for _, s in t) and t, 30, "tasks end")
    assert len(final) == len(runs)


TASKS = 500


def submit_all(cluster: Cluster, token: str, n: int) -> list[str]:
    """n sample tasks of about 0.5 s, submitted through all three hosts at once; half may be retried once."""
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[Any] = []

    def submit(short: str, count: int, offset: int) -> None:
        host = cluster.hosts[short]
        for i in range(count):
            retries = (offset + i) % 2
            body = {"task_type": "sample", "data": {"duration": 0.5, "steps": 2}, "retry_config": {"max_retries": retries}}
            status, answer = host.request("POST", "/tasks/submit", body, token=token)
            if status != 200:
                errors.append((short, status, answer))
                return
            with lock:
                ids.append(answer["data"]["task_id"])

    per = n // 3
    counts = {"a": per, "b": per, "c": n - 2 * per}
    threads = [threading.Thread(target=submit, args=(s, c, i * per)) for i, (s, c) in enumerate(counts.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(ids) == n
    return ids


def task_rows(cluster: Cluster, ids: list[str]) -> dict[str, tuple[str, str | None, str | None, int]]:
    with cluster.sql() as cur:
        cur.execute("SELECT id, status, error_code, worker_id, attempt FROM task WHERE id = ANY(%s)", (ids,))
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in cur.fetchall()}


def test_killing_every_process_of_host_b_loses_no_task_and_b_rejoins(cluster):
    a, b = cluster.hosts["a"], cluster.hosts["b"]
    _, token = user_token(cluster, on="a")
    ids = submit_all(cluster, token, TASKS)

    def running_on_b() -> list[str]:
        return [i for i, (st, _, worker, _) in task_rows(cluster, ids).items() if st == "running" and (worker or "").startswith("host-b:")]

    wait_until(lambda: len(running_on_b()) >= 2, 60, "tasks running on host B")
    on_b = running_on_b()
    killed = b.kill_all()
    killed_at = time.monotonic()
    assert len(killed) >= 5, killed  # supervisor, template, balancer, api, worker, scheduler

    # /health/nodes (asked on A) marks every process of B stale within the heartbeat timeout; A and C stay
    def b_down() -> bool:
        rows = nodes(a)
        return all(n["stale"] for n in rows if n["host"] == "host-b") and fresh_hosts(rows).keys() == {"host-a", "host-c"}

    wait_until(b_down, HEARTBEAT_TIMEOUT + 10, "host B marked down")
    assert time.monotonic() - killed_at <= HEARTBEAT_TIMEOUT + 3

    # every task ends: succeeded, or failed with worker_lost; none stays queued, running or retrying
    def all_ended() -> dict[str, tuple[str, str | None, str | None, int]] | None:
        rows = task_rows(cluster, ids)
        return rows if all(st in ("succeeded", "failed") for st, *_ in rows.values()) else None

    try:
        rows = wait_until(all_ended, 240, "every task ends")
    except AssertionError:
        rows = task_rows(cluster, ids)
        stuck = {i: r for i, r in rows.items() if r[0] not in ("succeeded", "failed")}
        raise AssertionError(f"{len(stuck)} tasks did not end, e.g. {list(stuck.items())[:5]}\n{cluster.tails()}") from None
    bad = {i: r for i, r in rows.items() if not (r[0] == "succeeded" or (r[0] == "failed" and r[1] == "worker_lost"))}
    assert not bad, list(bad.items())[:5]
    # B's running tasks were recovered by another host: retried there, or failed with worker_lost
    recovered = [i for i in on_b if rows[i][1] == "worker_lost" or (rows[i][3] == 2 and not (rows[i][2] or "").startswith("host-b:"))]
    assert recovered, {i: rows[i] for i in on_b}

    # B comes back with its data dir as it was left and rejoins by itself
    ups = b.count("appliance is up")
    b.start(wait=False)
    b.wait_up(after=ups)
    fresh = wait_until(lambda: (f := fresh_hosts(nodes(a))).get("host-b") == ROLES and f, 30, "host B fresh in /health/nodes again")
    assert set(fresh) == {"host-a", "host-b", "host-c"}
    pids_now = {n["pid"] for n in nodes(a) if n["host"] == "host-b"}
    assert not pids_now & set(killed)
    assert b.request("GET", "/auth/profile", token=token)[0] == 200
    # and its worker takes tasks again
    more = submit_all(cluster, token, 30)
    rows = wait_until(lambda: (r := task_rows(cluster, more)) and all(v[0] == "succeeded" for v in r.values()) and r, 90, "new tasks")
    assert any((w or "").startswith("host-b:worker:") for _, _, w, _ in rows.values()), rows
