"""Internal listeners need no port planning: the port to bind, the announcement, reading it back, the config rule."""

from __future__ import annotations

import pytest

from appliance import heartbeat, listen_address
from appliance.config import ConfigError, load_config
from appliance.contract import ADDRESS_FILE_ENV
from appliance.supervisor.kinds import appliance_kinds
from tests.conftest import write_config


def test_port_zero_lets_the_kernel_pick_and_a_pinned_base_port_still_counts_up():
    assert listen_address.port_for(0, 3) == 0
    assert listen_address.port_for(9000, 3) == 9003


def test_the_announced_address_is_read_back_whole(tmp_path):
    target = tmp_path / "api-0-1"
    assert listen_address.read(target) is None  # not announced yet: not ready, nothing to publish
    assert listen_address.announce(40123, {ADDRESS_FILE_ENV: str(target)}) == "127.0.0.1:40123"
    assert listen_address.read(target) == "127.0.0.1:40123"
    assert [p.name for p in tmp_path.iterdir()] == ["api-0-1"]  # written beside, then renamed: never half a file
    assert heartbeat._info["address"] == "127.0.0.1:40123"  # /health/nodes shows it from the next beat


@pytest.mark.parametrize("text", ["", "127.0.0.1:", "10.0.0.1:80", "127.0.0.1:0", "127.0.0.1:70000", "garbage"])
def test_anything_but_a_loopback_host_port_is_not_an_address(tmp_path, text):
    target = tmp_path / "monitor-0-1"
    target.write_text(text)
    assert listen_address.read(target) is None


def test_by_default_no_kind_has_a_fixed_address_and_a_pinned_one_does(make_config):
    kinds = {k.role: k for k in appliance_kinds(make_config(api={"workers": 2}), "json", available=lambda role: True)}
    assert kinds["api"].listens and kinds["monitor"].listens and not kinds["worker"].listens
    assert kinds["api"].address(1) is None and kinds["monitor"].address(0) is None
    pinned = make_config(api={"workers": 2, "base_port": 9100}, monitor={"port": 9190})
    kinds = {k.role: k for k in appliance_kinds(pinned, "json", available=lambda role: True)}
    assert kinds["api"].address(1) == "127.0.0.1:9101" and kinds["monitor"].address(0) == "127.0.0.1:9190"


@pytest.mark.parametrize(("section", "key"), [("api", "base_port"), ("monitor", "port")])
def test_a_privileged_internal_port_is_refused_naming_the_key(tmp_path, section, key):
    path = write_config(tmp_path / "data", **{section: {key: 80}})
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} = 80 is invalid; allowed: 0 \(the kernel picks"):
        load_config(path, env={})
