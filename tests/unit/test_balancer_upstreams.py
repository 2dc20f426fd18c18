"""The upstream registry: standalone groups, control-file diffs (add, drain, remove), routes by longest prefix."""

from __future__ import annotations

import json

from appliance.balancer.upstreams import UpstreamTable


def test_standalone_groups_and_routes(make_config) -> None:
    cfg = make_config(
        api={"workers": 2, "base_port": 9101},
        monitor={"port": 9190},
        balancer={"upstreams": [{"address": "10.0.0.5:80", "weight": 3}], "routes": [{"prefix": "/files/", "group": "files"}]},
    )
    reg = UpstreamTable(cfg)
    assert reg.load()
    assert [u.address for u in reg.groups["api"].upstreams] == ["127.0.0.1:9101", "127.0.0.1:9102", "10.0.0.5:80"]
    assert reg.groups["api"].upstreams[2].weight == 3
    assert reg.route("/api/x").name == "api"
    assert reg.route("/status").name == "monitor" and reg.route("/status/app.js").name == "monitor"
    assert reg.route("/statusx").name == "api"
    assert reg.route("/files/a").name == "files" and not reg.groups["files"].any_up()
    state = json.loads(reg.state_path.read_text())
    assert state["version"] == 0 and len(state["upstreams"]["api"]) == 3


def test_control_file_drains_and_removes(make_config) -> None:
    cfg = make_config(api={"workers": 1, "base_port": 9101}, monitor={"enabled": False})
    reg = UpstreamTable(cfg)
    reg.control_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"version": 1, "groups": {"api": [{"address": "127.0.0.1:9101", "weight": 1, "state": "up"}]}}
    reg.control_path.write_text(json.dumps(spec))
    assert reg.load() and not reg.load()  # unchanged mtime: nothing to do
    old = reg.groups["api"].upstreams[0]
    old.active = 1
    spec = {
        "version": 2,
        "groups": {"api": [{"address": "127.0.0.1:9201", "weight": 2, "state": "up"}]},
    }
    reg.apply(spec)
    assert old.state == "draining" and reg.groups["api"].pick().address == "127.0.0.1:9201"
    reg.sweep(0.0, 0.0)
    assert old in reg.groups["api"].upstreams  # still busy
    old.active = 0
    reg.sweep(0.0, 0.0)
    assert [u.address for u in reg.groups["api"].upstreams] == ["127.0.0.1:9201"]
    reg.apply({"version": 3, "groups": {"api": [{"address": "127.0.0.1:9201", "weight": 2, "state": "draining"}]}})
    assert reg.groups["api"].pick() is None
    reg.apply({"version": 4, "groups": {"api": [{"address": "127.0.0.1:9201", "weight": 2, "state": "up"}]}})
    assert reg.groups["api"].pick() is not None and json.loads(reg.state_path.read_text())["version"] == 4
