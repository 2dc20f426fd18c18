"""[monitor.alerts]: a nested table validated key by key, overridable from the environment, documented in the sample."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from appliance import config
from appliance.config import ConfigError, load_config
from tests.conftest import write_config


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config.Config:
    path = write_config(tmp_path)
    path.write_text(text)
    return load_config(path, env=env or {})


def test_alert_thresholds_load_and_bad_ones_are_named(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "[monitor.alerts]\ncpu_percent = 75\nhold_seconds = 5\n")
    assert cfg.monitor.alerts.cpu_percent == 75 and cfg.monitor.alerts.hold_seconds == 5
    assert cfg.monitor.alerts.disk_free_percent == 10  # the defaults of the keys not given
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "[monitor.alerts]\ncpu_percent = 200\ncpu_pct = 5\n")
    text = "\n".join(err.value.problems)
    assert "[monitor.alerts] cpu_percent = 200 is invalid" in text
    assert "[monitor.alerts] unknown key 'cpu_pct'" in text


def test_alert_thresholds_from_the_environment(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "", env={"APPLIANCE_MONITOR__ALERTS__P99_MS": "750", "APPLIANCE_MONITOR__SESSION_MINUTES": "15"})
    assert cfg.monitor.alerts.p99_ms == 750 and cfg.monitor.session_minutes == 15


def test_the_sample_config_documents_the_nested_table_and_reads_back() -> None:
    sample = config.render_sample()
    assert "[monitor.alerts]" in sample and "# host cpu % above which an alert fires" in sample
    parsed = tomllib.loads(sample)
    assert parsed["monitor"]["alerts"]["queue_age_seconds"] == 300.0
    assert "| `monitor.alerts.hold_seconds` | `30.0` |" in config.render_markdown_table()
    child = config.Config.from_json(config.Config().to_json())  # how the supervisor hands the tree to children
    assert child.monitor.alerts == config.AlertSettings()


def test_the_alert_webhook_is_an_http_url_or_empty_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert _load(tmp_path, "").monitor.alert_webhook == ""  # off by default
    good = "https://hooks.example.com/alerts?k=1"
    assert _load(tmp_path, f'[monitor]\nalert_webhook = "{good}"\n').monitor.alert_webhook == good
    for bad in (
        "ftp://hooks.example.com/x",
        "hooks.example.com/alerts",
        "http://user:pw@hooks.example.com/",
        "http://h:99999/",
        "http://a b/",
    ):
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, f'[monitor]\nalert_webhook = "{bad}"\n')
        assert any("[monitor] alert_webhook" in p and "is invalid" in p for p in err.value.problems), (bad, err.value.problems)
