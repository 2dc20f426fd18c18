"""Pure parts of the supervisor: notify addresses and watchdog, the upstreams document, the
balancer state, the exit descriptions, the status rendering, the kinds table, hosted jobs and the unit."""

import json
import os
import signal
import sys
import threading

import pytest

from appliance.supervisor import channel, kinds, notify, relay, roles, rollout
from appliance.supervisor.child import describe_exit
from appliance.supervisor.commands import render_status
from appliance.supervisor.main import public_url
from appliance.supervisor.unit import render


def test_notify_socket_address_abstract_and_path():
    assert notify.socket_address("@sd-notify") == b"\0sd-notify"
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
    ],
)
def test_watchdog_interval_is_half_and_only_for_our_pid(env, expected):
    assert notify.watchdog_interval(env, pid=42) == expected


def test_notifier_without_socket_is_a_no_op():
    n = notify.Notifier({})
    assert not n.enabled and not n.send("READY=1") and not n.ping_due(1e9)


def test_upstreams_document_shape():
    doc = channel.upstreams_document(7, {"api": [("127.0.0.1:8101", "up"), ("127.0.0.1:8102", "draining")], "monitor": []})
    assert doc == {
        "version": 7,
        "groups": {
            "api": [
                {"address": "127.0.0.1:8101", "weight": 1, "state": "up"},
                {"address": "127.0.0.1:8102", "weight": 1, "state": "draining"},
            ],
            "monitor": [],
        },
    }


def test_channel_publishes_only_changes_and_reads_state(tmp_path):
    ch = channel.Channel(tmp_path)
    groups = {"api": [("127.0.0.1:1", "up")]}
    assert ch.publish(groups) and ch.version == 1
    assert not ch.publish({"api": [("127.0.0.1:1", "up")]})
    assert ch.publish({"api": [("127.0.0.1:1", "draining")]}) and ch.version == 2
    assert json.loads(ch.upstreams_path.read_text())["version"] == 2
    assert ch.read_state() is None
    ch.state_path.write_text("{not json")
    assert ch.read_state() is None
    ch.state_path.write_text(json.dumps({"version": 2, "upstreams": {"api": [{"address": "127.0.0.1:1", "active": 3}]}}))
    state = ch.read_state()
    assert state is not None
    assert not state.idle("api", "127.0.0.1:1", 2)  # still 3 in flight
    assert not state.idle("api", "127.0.0.1:1", 3)  # not applied yet
    ch.state_path.write_text(json.dumps({"version": 2, "upstreams": {"api": [{"address": "127.0.0.1:1", "active": 0}]}}))
    assert ch.read_state().idle("api", "127.0.0.1:1", 2)
    assert ch.read_state().idle("api", "127.0.0.1:9", 2)  # gone from the balancer: nothing in flight


def test_channel_combines_the_state_of_every_balancer_process_that_is_running(tmp_path):
    ch = channel.Channel(tmp_path)
    assert ch.combined_state() is None

    def write(index: int, pid: int, version: int, items: list[dict]) -> None:
        ch.state_path_for(index).write_text(json.dumps({"version": version, "pid": pid, "upstreams": {"api": items}}))

    a, b = "127.0.0.1:1", "127.0.0.1:2"
    write(0, 100, 3, [{"address": a, "state": "up", "active": 2, "requests": 10, "failures": 1}])
    write(1, 101, 4, [{"address": a, "state": "draining", "active": 1, "requests": 5}, {"address": b, "state": "up", "requests": 7}])
    os.utime(ch.state_path_for(0), (1, 1))  # process 1 wrote last: its list and states are shown
    state = ch.combined_state()
    assert state is not None and state.version == 3 and state.pid == 101  # the version every process applied
    assert state.upstreams["api"] == [
        {"address": a, "state": "draining", "active": 3, "requests": 15, "failures": 1},
        {"address": b, "state": "up", "active": 0, "requests": 7, "failures": 0},
    ]
    only = ch.combined_state(live={100})  # process 1 stopped: its file no longer counts
    assert only is not None and only.upstreams["api"] == [{"address": a, "state": "up", "active": 2, "requests": 10, "failures": 1}]
    assert ch.combined_state(live=set()) is None
    write(1, 101, 4, [{"address": a, "active": "many", "requests": True}, "junk"])  # garbage counts as nothing
    assert ch.combined_state(live={101}).upstreams["api"] == [{"address": a, "active": 0, "requests": 0, "failures": 0}]


def test_describe_exit():
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_relay_wraps_non_json_lines_in_json_mode():
    line = relay.wrap("Traceback (most recent call last):", "api", 12, "json")
    entry = json.loads(line)
    assert entry["role"] == "api" and entry["pid"] == 12 and entry["message"].startswith("Traceback")
    assert relay.wrap('{"a": 1}', "api", 12, "json") == '{"a": 1}'
    assert relay.wrap("plain", "api", 12, "text") == "plain"


def test_child_command_reruns_this_executable_with_a_role():
    cmd = kinds.child_command("api", 2, "text")
    assert cmd[0] == sys.executable and cmd[-6:] == ["_child", "api", "--index", "2", "--log-format", "text"]


def test_kinds_table_from_config_leaves_out_missing_roles(make_config):
    cfg = make_config(api={"workers": 3, "base_port": 9000}, queue={"workers": 0}, monitor={"enabled": False})
    table = kinds.appliance_kinds(cfg, "json", available=lambda role: role != "scheduler")
    assert [(k.role, k.count) for k in table] == [("api", 3), ("balancer", 1)]
    api = table[0]
    assert api.address(2) == "127.0.0.1:9002" and api.drained and api.group == "api"
    assert table[1].listeners and not table[1].group


def test_the_monitor_runs_the_scheduler_and_no_scheduler_process_is_started(make_config):
    table = {k.role: k for k in kinds.appliance_kinds(make_config(), "json")}
    assert "scheduler" not in table  # count 0: left out
    assert table["monitor"].count == 1 and table["monitor"].jobs == ("scheduler",)
    assert all(k.jobs == () for role, k in table.items() if role != "monitor")


def test_with_the_monitor_off_the_scheduler_is_its_own_process_again(make_config):
    table = {k.role: k for k in kinds.appliance_kinds(make_config(monitor={"enabled": False}), "json")}
    assert "monitor" not in table
    scheduler = table["scheduler"]
    assert (scheduler.count, scheduler.readiness, scheduler.replace, scheduler.jobs) == (1, "heartbeat", "stop_first", ())
    assert scheduler.command(0)[-6:] == ["_child", "scheduler", "--index", "0", "--log-format", "json"]


def test_a_monitor_missing_from_the_build_leaves_the_scheduler_its_own_process(make_config):
    table = {k.role: k for k in kinds.appliance_kinds(make_config(), "json", available=lambda role: role != "monitor")}
    assert "monitor" not in table and table["scheduler"].count == 1


def test_the_monitor_hosts_the_scheduler_while_it_is_enabled(make_config):
    assert roles.hosted_jobs("monitor", make_config()) == ("scheduler",)
    assert roles.hosted_jobs("monitor", make_config(monitor={"enabled": False})) == ()
    assert roles.hosted_jobs("api", make_config()) == ()
    assert set(roles.JOBS) <= set(roles.ROLES)


def _job(fn, cfg):
    deaths: list[str] = []
    job = roles.HostedJob("scheduler", fn, cfg, on_death=lambda: deaths.append(job.died or ""))
    return job, deaths


def test_a_hosted_job_that_raises_or_returns_unasked_is_dead_and_stops_the_process(make_config):
    cfg = make_config()

    def raises(cfg, stop):
        raise RuntimeError("broken loop")

    job, deaths = _job(raises, cfg)
    job.start()
    job.join(5)
    assert deaths == ["RuntimeError: broken loop"]
    assert roles.stop_jobs([job], 0, cfg) == 1  # the role's clean exit becomes 1: the supervisor restarts it
    assert roles.stop_jobs([job], 3, cfg) == 3  # a status of the role's own stays

    job, deaths = _job(lambda cfg, stop: 0, cfg)
    job.start()
    job.join(5)
    assert deaths == ["its loop returned"]


def test_a_hosted_job_asked_to_stop_ends_cleanly(make_config):
    cfg = make_config()
    started = threading.Event()

    def loop(cfg, stop):
        started.set()
        while not stop.wait(0.01):
            pass

    job, deaths = _job(loop, cfg)
    job.start()
    assert started.wait(5)
    assert roles.stop_jobs([job], 0, cfg) == 0
    assert not job.is_alive() and job.died is None and deaths == []


def test_restart_only_keys_and_balancer_changes(make_config):
    a = make_config()
    b = make_config(balancer={"listen": "127.0.0.1:9999"}, api={"workers": 4})
    b.server.data_dir = a.server.data_dir
    assert rollout.restart_only_changes(a, b) == ["[balancer] listen"]
    assert rollout.balancer_changed(a, b)
    c = make_config(queue={"workers": 5})
    c.server.data_dir = a.server.data_dir
    c.secrets = a.secrets
    c.source = a.source
    assert not rollout.balancer_changed(a, c)


def test_public_url(make_config):
    assert public_url(make_config(balancer={"listen": "0.0.0.0:8443"})) == "http://127.0.0.1:8443"
    assert public_url(make_config(server={"public_url": "https://api.example.com"})) == "https://api.example.com"


def test_status_rendering_marks_unhealthy():
    doc = {
        "phase": "running",
        "url": "http://127.0.0.1:8080",
        "pid": 1,
        "config": "x",
        "healthy": False,
        "processes": [
            {"role": "api", "index": 0, "slot": 0, "pid": 10, "state": "up", "restarts": 0, "uptime": 5, "cpu": 1.5, "rss": 50e6},
            {"role": "api", "index": 1, "slot": 1, "pid": None, "state": "failed", "restarts": 5, "uptime": None, "cpu": None},
        ],
        "upstreams": {"api": [{"address": "127.0.0.1:8101", "state": "healthy", "active": 0, "requests": 9, "failures": 0}]},
        "queue": {"queued": 2, "running": 1},
    }
    text = render_status(doc)
    assert "failed" in text and "47.7M" in text and "queued 2" in text and "UNHEALTHY" in text


def test_status_rendering_shows_pss_and_its_total():
    doc = {
        "phase": "running",
        "pid": 1,
        "healthy": True,
        "supervisor": {"pss": 10 * 2**20},
        "processes": [
            {"role": "api", "index": 0, "slot": 0, "pid": 10, "state": "up", "restarts": 0, "rss": 50e6, "pss": 12 * 2**20},
            {"role": "template", "index": 0, "slot": 0, "pid": 11, "state": "up", "restarts": 0, "rss": 60e6, "pss": 8 * 2**20},
        ],
    }
    text = render_status(doc)
    assert "12.0M" in text and "\ntemplate " in text
    assert "memory: 30.0M PSS in 3 processes" in text


def test_status_rendering_names_what_a_process_also_runs():
    doc = {
        "phase": "running",
        "pid": 1,
        "healthy": True,
        "processes": [
            {
                "role": "monitor",
                "index": 0,
                "slot": 0,
                "pid": 12,
                "state": "up",
                "restarts": 0,
                "jobs": ["scheduler"],
                "address": "127.0.0.1:9",
            },
            {"role": "worker", "index": 0, "slot": 0, "pid": 13, "state": "up", "restarts": 0},
        ],
    }
    lines = render_status(doc).splitlines()
    monitor = next(line for line in lines if line.startswith("monitor"))
    assert monitor.startswith("monitor + scheduler ") and monitor.endswith("127.0.0.1:9")
    assert not any(line.startswith("scheduler") for line in lines)
    # the columns stay aligned with the wider label
    header = next(line for line in lines if line.startswith("role"))
    worker = next(line for line in lines if line.startswith("worker "))
    assert header.index("index") == worker.index("    0") == monitor.index("    0")


def test_unit_is_hardened(make_config):
    cfg = make_config(supervisor={"grace_period": 20})
    unit = render(cfg, user="svc", executable="/usr/bin/appliance")
    for line in (
        "Type=notify",
        "ExecReload=/bin/sh -c 'kill -HUP $$MAINPID'",
        "Restart=on-failure",
        "User=svc",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={cfg.data_dir}",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "LimitNOFILE=65536",
        "TimeoutStopSec=35",
        "CapabilityBoundingSet=",
    ):
        assert line in unit.splitlines(), line
    assert any(line.startswith("WatchdogSec=") for line in unit.splitlines())
    assert f"ExecStart=/usr/bin/appliance run --config {cfg.source}" in unit
    low = render(make_config(balancer={"listen": "0.0.0.0:443"}), executable="/usr/bin/appliance")
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in low


def test_packaged_unit_matches_the_generator():
    from pathlib import Path

    from appliance.supervisor.unit import packaged

    committed = Path(__file__).resolve().parents[2] / "packaging" / "appliance.service"
    assert committed.read_text() == packaged(), "regenerate packaging/appliance.service with appliance.supervisor.unit.packaged()"


def test_a_child_handed_the_inherited_config_uses_that_object_and_parses_any_other(make_config, monkeypatch):
    import argparse

    from appliance import child_config
    from appliance.contract import CONFIG_ENV

    cfg = make_config(api={"threads": 3})
    monkeypatch.setattr(child_config, "_inherited", None)
    child_config.inherit_config(cfg)
    args = argparse.Namespace(config=None)
    monkeypatch.setenv(CONFIG_ENV, cfg.to_json().decode())
    assert child_config.child_config(args) is cfg
    other = make_config(api={"threads": 5})  # a SIGHUP's new config
    monkeypatch.setenv(CONFIG_ENV, other.to_json().decode())
    got = child_config.child_config(args)
    assert got is not cfg and got.api.threads == 5
