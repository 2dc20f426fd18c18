"""[balancer] processes: the auto count, the bounds `appliance check` enforces, the supervisor's table, and the
run files each balancer process owns (its state file; the shared rate-limit buckets the supervisor clears)."""

from __future__ import annotations

import pytest

from appliance import contract
from appliance.config import ConfigError
from appliance.supervisor.channel import Channel
from appliance.supervisor.kinds import appliance_kinds


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 2), (4, 2), (8, 2), (12, 3), (16, 4), (64, 16)])
def test_zero_means_one_on_small_machines_else_a_quarter_of_the_cpus_at_least_two(make_config, monkeypatch, cpus, expected):
    cfg = make_config()
    assert cfg.balancer.processes == 0
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    assert cfg.balancer_processes == expected


def test_an_explicit_count_wins_and_its_bounds_are_checked(make_config):
    assert make_config(balancer={"processes": 3}).balancer_processes == 3
    for bad in (-1, 65):
        with pytest.raises(ConfigError, match="processes"):
            make_config(balancer={"processes": bad})


def test_the_supervisor_starts_that_many_balancers(make_config):
    kinds = appliance_kinds(make_config(balancer={"processes": 3}), "json", available=lambda role: True)
    assert [k.count for k in kinds if k.role == "balancer"] == [3]


def test_each_balancer_has_its_own_state_file_and_a_start_clears_them_and_the_shared_buckets(tmp_path):
    names = [contract.balancer_state_file(i) for i in range(3)]
    assert names == [contract.BALANCER_STATE_FILE, "balancer-state-1.json", "balancer-state-2.json"]
    channel = Channel(tmp_path)
    stale = [tmp_path / n for n in names] + [tmp_path / contract.RATE_LIMIT_FILE, tmp_path / contract.UPSTREAMS_FILE]
    for path in stale:
        path.write_text("{}")
    channel.reset()
    assert [p for p in stale if p.exists()] == []
