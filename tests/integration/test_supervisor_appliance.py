"""The real `appliance run` on free loopback ports: kill -9 of every kind of child under a stream of GETs,
SIGHUP rolling restart with zero failed requests (and a broken config refused), a crash loop given up
while the rest serve, SIGTERM draining requests and a running task, and the systemd notify sequence.
The scheduler runs in the monitor's process ("housekeeping"), or as its own with [monitor] enabled = false."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import socket
import time

import pytest

from tests.integration.supervised import Appliance, Stream, http_json, wait_until
from tests.procs import free_range


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("supervised"), api_workers=2, task_workers=1, monitor=True)
    app.start()
    yield app
    assert app.stop() == 0


def test_started_with_one_line_and_the_url(appliance):
    up = [m for m in appliance.messages() if m.startswith("appliance is up on")]
    assert up == [f"appliance is up on http://127.0.0.1:{appliance.port} " + up[0].split(" ", 5)[-1]]
    status, body = http_json(appliance.port, "GET", "/health/ping")
    assert status == 200 and body["status"] == "ok"
    # Every process logs JSON lines with its role and pid; the config (with its secrets) is never logged.
    roles_seen = {e.get("role") for e in appliance.lines()}
    assert {"supervisor", "api", "worker", "monitor", "balancer"} <= roles_seen
    assert "scheduler" not in roles_seen  # no process of its own: its lines come from the monitor
    assert "scheduler ready" in appliance.messages("monitor")
    secrets = (appliance.data / "secrets.toml").read_text()
    jwt_secret = next(line.split('"')[1] for line in secrets.splitlines() if line.startswith("jwt_secret"))
    assert jwt_secret not in appliance.log.read_text()


def test_second_appliance_on_the_same_data_dir_is_refused(appliance):
    result = appliance.cli("run", timeout=30)
    assert result.returncode == 1
    assert f"pid {appliance.proc.pid}" in result.stderr and "already running" in result.stderr


def test_status_command_lists_every_process(appliance):
    result = appliance.cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    for role in ("api", "worker", "monitor + scheduler", "balancer"):
        assert f"\n{role} " in result.stdout
    assert "\nscheduler " not in result.stdout
    assert "healthy" in result.stdout and "queue: queued" in result.stdout
    sock = appliance.data / "run" / "control.sock"
    assert sock.stat().st_mode & 0o777 == 0o600


def test_heartbeats_of_every_process_reach_the_node_table(appliance):
    def nodes() -> set[str]:
        status, body = http_json(appliance.port, "GET", "/health/nodes")
        return {n["role"] for n in body["data"]["nodes"]} if status == 200 else set()

    assert wait_until(lambda: {"api", "worker", "monitor", "balancer"} <= nodes(), 10), nodes()
    rows = http_json(appliance.port, "GET", "/health/nodes")[1]["data"]["nodes"]
    assert "scheduler" not in {n["role"] for n in rows}
    assert [n["info"].get("jobs") for n in rows if n["role"] == "monitor"] == [["scheduler"]]  # the monitor's row stands for it


def test_no_scheduler_process_and_the_monitor_row_says_it_runs_the_scheduler(appliance):
    rows = appliance.status()["processes"]
    assert "scheduler" not in {r["role"] for r in rows}
    assert [r["jobs"] for r in rows if r["role"] == "monitor"] == [["scheduler"]]
    assert all(r["jobs"] == [] for r in rows if r["role"] not in ("monitor", "template"))
    assert "1 monitor + scheduler" in appliance.wait_for("appliance is up on")


def cron_schedule(app: Appliance, token: str) -> int:
    """A schedule made through the API, its slot of this minute made due now (instead of waiting for the clock)."""
    body = {"task_type": "sample", "schedule": {"type": "cron", "expression": "* * * * *", "timezone": "UTC"}, "data": {"x": 1}}
    status, answer = http_json(app.port, "POST", "/tasks/schedule", body, token)
    assert status == 200, answer
    sid = answer["data"]["schedule_id"]
    from appliance import db as dbmod
    from appliance.config import load_config
    from appliance.db.models import Schedule

    handle = dbmod.open_database(load_config(app.config, env={}))
    try:
        due = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=3)
        assert Schedule.update(next_run_at=due).where(Schedule.id == sid).execute() == 1
    finally:
        handle.close()
    return sid


def fired_task(app: Appliance, sid: int, token: str, timeout: float = 20) -> dict:
    """The first task the schedule fired, once it succeeded; and which process fired it (its log line)."""
    line = wait_until(
        lambda: next((e for e in app.lines() if e.get("message") == "schedule fired" and e.get("schedule_id") == sid), None), timeout
    )
    assert line, f"schedule {sid} did not fire; log tail:\n{app.log.read_text()[-3000:]}"
    done = wait_until(
        lambda: (
            (d := http_json(app.port, "GET", f"/tasks/status/{line['task_id']}", token=token)[1]["data"])["status"] == "succeeded" and d
        ),
        30,
    )
    assert done, http_json(app.port, "GET", f"/tasks/status/{line['task_id']}", token=token)
    return line


def new_token(app: Appliance) -> str:
    name = f"cron{secrets.token_hex(3)}"
    result = app.cli("user", "create", name, "--password-stdin", stdin="a-long-password-1\n")
    assert result.returncode == 0, result.stderr
    status, body = http_json(app.port, "POST", "/auth/login", {"username": name, "password": "a-long-password-1"})
    assert status == 200, body
    return body["data"]["access_token"]


@pytest.mark.slow
def test_kill_9_each_child_during_a_stream_of_gets(appliance):
    kinds = ["api", "worker", "balancer", "monitor"]  # the monitor's process runs the scheduler too
    took: dict[str, float] = {}
    with Stream(appliance.port) as stream:
        time.sleep(0.5)
        for role in kinds:
            before = appliance.pids(role)
            assert before, f"no live {role}"
            slot, pid = next(iter(before.items()))
            failures_before = len(stream.failures)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            back = wait_until(lambda: appliance.pids(role).get(slot) not in (None, pid), 10, step=0.02)  # noqa: B023
            took[role] = time.monotonic() - t0
            assert back, f"{role} did not come back"
            time.sleep(0.5)
            new_failures = stream.failures[failures_before:]
            if role == "balancer":
                # Only requests in flight inside the killed balancer may fail (one per client thread at most);
                # new connections wait in the backlog of the socket the supervisor holds.
                assert len(new_failures) <= len(stream.threads), new_failures
            else:
                assert new_failures == [], (role, new_failures)
        time.sleep(0.5)
    assert stream.ok > 50
    assert stream.refused == 0
    slow = {role: round(t, 2) for role, t in took.items() if t > (3.0 if role in ("api", "worker") else 2.0)}
    assert not slow, f"too slow to come back: {slow} (all: {took})"


@pytest.mark.slow
def test_sighup_rolls_every_worker_with_zero_failed_requests(appliance):
    api_before = appliance.pids("api")
    worker_before = appliance.pids("worker")
    monitor_before = appliance.pids("monitor")[0]
    balancer_before = appliance.pids("balancer")
    addresses_before = set(appliance.addresses("api").values())
    done_before = appliance.count("reload done")
    good = appliance.config.read_text()
    assert "health_interval = 0.5" in good
    appliance.config.write_text(good.replace("health_interval = 0.5", "health_interval = 0.4"))  # a balancer setting
    with Stream(appliance.port, threads=3) as stream:
        time.sleep(0.3)
        appliance.signal(signal.SIGHUP)
        appliance.wait_for("reload done", timeout=60, after=done_before)
        time.sleep(0.5)
    appliance.config.write_text(good)
    assert stream.failures == [], stream.failures
    assert stream.ok > 50
    api_after, worker_after = appliance.pids("api"), appliance.pids("worker")
    assert len(api_after) == 2 and not set(api_after.values()) & set(api_before.values())
    assert len(worker_after) == 1 and not set(worker_after.values()) & set(worker_before.values())
    balancer_after = appliance.pids("balancer")
    assert len(balancer_after) == 1 and balancer_after != balancer_before  # its settings changed: replaced too
    # The new api workers listen on ports of their own (the kernel's picks) and the balancer got them.
    addresses_after = set(appliance.addresses("api").values())
    assert len(addresses_after) == 2 and not addresses_after & addresses_before
    applied = {m["address"] for m in appliance.status()["upstreams"]["api"] if m["state"] != "draining"}
    assert addresses_after <= applied
    assert all(m.endswith("is drained") for m in appliance.messages() if "is drained" in m)
    # The monitor was stopped first and replaced, its scheduler thread with it: a clean stop, exit 0.
    monitor_after = appliance.pids("monitor")[0]
    assert monitor_after != monitor_before
    assert f"monitor[0] (pid {monitor_before}) stopped: exited with status 0" in appliance.messages()
    mine = [e for e in appliance.lines() if e.get("pid") == monitor_before and e.get("message") == "scheduler stopped"]
    assert len(mine) == 1 and isinstance(mine[0]["fired"], int), mine
    assert wait_until(lambda: any(e.get("pid") == monitor_after and e.get("message") == "scheduler ready" for e in appliance.lines()), 10)


@pytest.mark.slow
def test_sighup_with_a_broken_config_keeps_serving_the_old_one(appliance):
    good = appliance.config.read_text()
    pids = appliance.pids("api")
    refused_before = appliance.count("reload refused")
    try:
        assert "threads = 4" in good
        appliance.config.write_text(good.replace("threads = 4", "threads = 0"))
        appliance.signal(signal.SIGHUP)
        line = appliance.wait_for("reload refused", timeout=15, after=refused_before)
        assert "[api] threads = 0 is invalid" in line  # names what is wrong
    finally:
        appliance.config.write_text(good)
    time.sleep(0.5)
    assert appliance.pids("api") == pids
    assert http_json(appliance.port, "GET", "/health/ping")[0] == 200


# After the tests that kill and replace children (the monitor's restart backoff starts afresh here).
def test_a_schedule_fires_from_the_monitor_and_again_after_kill_9_of_the_monitor(appliance):
    token = new_token(appliance)
    monitor = appliance.pids("monitor")[0]
    restarts = next(r["restarts"] for r in appliance.status()["processes"] if r["role"] == "monitor")
    line = fired_task(appliance, cron_schedule(appliance, token), token)
    assert (line["role"], line["pid"]) == ("monitor", monitor)
    os.kill(monitor, signal.SIGKILL)
    assert wait_until(lambda: appliance.pids("monitor").get(0) not in (None, monitor), 15), "the monitor did not come back"
    restarted = appliance.pids("monitor")[0]
    line = fired_task(appliance, cron_schedule(appliance, token), token)
    assert (line["role"], line["pid"]) == ("monitor", restarted)
    assert [r["restarts"] for r in appliance.status()["processes"] if r["role"] == "monitor"] == [restarts + 1]


def test_with_the_monitor_off_the_scheduler_is_its_own_process_and_fires(tmp_path):
    app = Appliance(tmp_path, api_workers=1, task_workers=1, monitor=False)
    app.start()
    try:
        rows = app.status()["processes"]
        assert "monitor" not in {r["role"] for r in rows}
        [scheduler] = [r for r in rows if r["role"] == "scheduler"]
        assert scheduler["state"] == "up" and scheduler["jobs"] == []
        result = app.cli("status")
        assert result.returncode == 0 and "\nscheduler " in result.stdout, result.stdout
        token = new_token(app)
        line = fired_task(app, cron_schedule(app, token), token)
        assert (line["role"], line["pid"]) == ("scheduler", scheduler["pid"])
    finally:
        assert app.stop() == 0
    assert f"scheduler[0] (pid {scheduler['pid']}) stopped: exited with status 0" in app.messages()
    assert [e["fired"] for e in app.lines() if e.get("role") == "scheduler" and e.get("message") == "scheduler stopped"] == [1]


@pytest.mark.slow
def test_sighup_switching_the_monitor_off_and_on_moves_the_scheduler(tmp_path):
    app = Appliance(tmp_path, api_workers=1, task_workers=1, monitor=True)
    app.start()
    try:

        def runs() -> dict[str, list[str]]:
            return {r["role"]: r["jobs"] for r in app.status()["processes"] if r["role"] in ("monitor", "scheduler") and r["state"] == "up"}

        assert runs() == {"monitor": ["scheduler"]}
        good = app.config.read_text()
        assert good.count("enabled = true") == 1  # [monitor] enabled
        app.config.write_text(good.replace("enabled = true", "enabled = false"))
        app.signal(signal.SIGHUP)
        app.wait_for("reload done", timeout=60)
        assert wait_until(lambda: runs() == {"scheduler": []}, 10), runs()
        app.config.write_text(good)
        app.signal(signal.SIGHUP)
        app.wait_for("reload done", timeout=60, after=1)
        assert wait_until(lambda: runs() == {"monitor": ["scheduler"]}, 10), runs()
        token = new_token(app)
        line = fired_task(app, cron_schedule(app, token), token)
        assert (line["role"], line["pid"]) == ("monitor", app.pids("monitor")[0])
    finally:
        assert app.stop() == 0
    assert [m for m in app.messages() if m.startswith("scheduler[0]") and "stopped" in m][0].endswith("exited with status 0")


def take_port(sock: socket.socket, port: int, timeout: float) -> bool:
    errors: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError as exc:
            errors.add(str(exc))
        time.sleep(0.005)
    raise AssertionError(f"cannot bind 127.0.0.1:{port}: {errors}")


@pytest.mark.slow
def test_a_child_that_crashes_at_start_is_given_up_while_the_rest_serve(tmp_path):
    # Pinned ports (the operator's opt-in): a worker restarted on a port the kernel picks could not be blocked.
    pinned = {"workers": 2, "threads": 4, "base_port": free_range(4)}
    app = Appliance(tmp_path, api_workers=2, task_workers=1, api=pinned, supervisor={"max_restarts": 3, "restart_window": 60})
    app.start()
    try:
        slot, pid = sorted(app.pids("api").items())[-1]
        port = int(next(r["address"] for r in app.status()["processes"] if r["pid"] == pid).rsplit(":", 1)[1])
        blocker = socket.socket()
        # SO_REUSEADDR gets past the killed worker's TIME_WAIT connections; clearing it afterwards makes the port
        # ours alone: a restarted worker cannot bind it, and nothing listens (connections are refused, not hung).
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with Stream(app.port) as stream:
            os.kill(pid, signal.SIGKILL)
            assert take_port(blocker, port, 5)
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            app.wait_for(f"api[{slot}] exited", timeout=20)
            line = app.wait_for("giving up on it", timeout=30)
            assert f"api[{slot}]" in line and "crashed 4 times" in line
            time.sleep(0.5)
        assert stream.failures == [], stream.failures
        assert stream.ok > 20
        status = app.status()
        assert not status["healthy"]
        assert [r["state"] for r in status["processes"] if r["role"] == "api" and r["slot"] == slot] == ["failed"]
        result = app.cli("status")
        assert result.returncode == 1 and "failed" in result.stdout and "UNHEALTHY" in result.stdout
        blocker.close()
        # A supervisor killed outright leaves no orphans: each child sees its parent gone and stops itself.
        children = [r["pid"] for r in status["processes"] if r["pid"]]
        app.signal(signal.SIGKILL)
        app.proc.wait(5)
        assert wait_until(lambda: not any(alive(p) for p in children), 15), [p for p in children if alive(p)]
    finally:
        app.stop()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def recv_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if got[-1].startswith(wanted):
            break
    return got


def is_subsequence(wanted: list[str], got: list[str]) -> bool:
    it = iter(got)
    return all(any(g == w for g in it) for w in wanted)


def login(app: Appliance) -> str:
    result = app.cli("user", "create", "tasker", "--admin", "--password-stdin", stdin="a-long-password-1\n")
    assert result.returncode == 0, result.stderr
    status, body = http_json(app.port, "POST", "/auth/login", {"username": "tasker", "password": "a-long-password-1"})
    assert status == 200, body
    return body["data"]["access_token"]


@pytest.mark.slow
def test_notify_reload_and_sigterm_drain_with_a_running_task(tmp_path):
    name = f"appliance-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        app = Appliance(tmp_path, api_workers=2, task_workers=1, env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"})
        app.start(wait=False)
        try:
            got = recv_until(notify, "READY=1", 90)
            got += recv_until(notify, "WATCHDOG=1", 3)
            app.signal(signal.SIGHUP)
            got += recv_until(notify, "READY=1", 60)
            app.wait_for("reload done", timeout=30)
            token = login(app)
            status, body = http_json(app.port, "POST", "/tasks/submit", {"task_type": "sleep", "data": {"seconds": 2}}, token)
            assert status in (200, 201, 202), body
            task_id = body["data"]["task_id"]

            def task_status() -> str:
                return http_json(app.port, "GET", f"/tasks/status/{task_id}", token=token)[1]["data"]["status"]

            assert wait_until(lambda: task_status() == "running", 20)
            with Stream(app.port, threads=3) as stream:
                time.sleep(0.3)
                app.signal(signal.SIGTERM)
                got += recv_until(notify, "STOPPING=1", 10)
                assert app.proc.wait(30) == 0
            assert stream.failures == [], stream.failures  # every request that got in was answered
        finally:
            app.stop()
    assert is_subsequence(["READY=1", "WATCHDOG=1", "RELOADING=1", "READY=1", "STOPPING=1"], [m.splitlines()[0] for m in got]), got
    # The task finished inside the grace period.
    from appliance import db as dbmod
    from appliance.config import load_config
    from appliance.db.models import Task

    handle = dbmod.open_database(load_config(app.config, env={}))
    try:
        assert Task.get_by_id(task_id).status == "succeeded"
    finally:
        handle.close()
