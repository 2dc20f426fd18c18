"""The typed config tree: validation names file, section, key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.config import Config, ConfigError, load_config
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = write_config(tmp_path)
    path.write_text(text)
    return load_config(path, env=env or {})


def test_defaults_load_and_data_dir_is_the_config_directory(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg.data_dir == tmp_path.resolve()
    assert cfg.api.threads == 8
    assert cfg.balancer.listen == "127.0.0.1:8080"
    assert len(cfg.secrets.jwt_secret) >= 32


def test_misspelt_key_and_wrong_type_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, '[api]\nworkers = "many"\nthreadz = 4\n[queue]\nworkers = -1\n')
    problems = exc.value.problems
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "[api] workers = 'many'" in text and "an integer" in text
    assert "unknown key 'threadz'" in text and "threads" in text
    assert "[queue] workers = -1" in text and ">= 0" in text
    assert str(tmp_path / "appliance.toml") in problems[0]


def test_unknown_section_and_bad_enum(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, '[apii]\nx = 1\n[logging]\nformat = "xml"\n')
    text = "\n".join(exc.value.problems)
    assert "unknown section [apii]" in text
    assert "format = 'xml'" in text and "'json'" in text


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "[api]\nworkers = 1\n", env={"APPLIANCE_API__WORKERS": "3", "APPLIANCE_LOGGING__FORMAT": "text"})
    assert cfg.api.workers == 3
    assert cfg.logging.format == "text"


def test_bad_environment_value_names_the_variable_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, "", env={"APPLIANCE_API__WORKERS": "lots", "APPLIANCE_NOPE__X": "1"})
    text = "\n".join(exc.value.problems)
    assert "[api] workers = 'lots'" in text
    assert "APPLIANCE_NOPE__X" in text


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="appliance init"):
        load_config(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[api\n")


def test_missing_secrets_refuse_to_start(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "secrets.toml").unlink()
    with pytest.raises(ConfigError, match="jwt_secret' is missing"):
        load_config(path, env={})


def test_relations_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, '[balancer]\ntls_cert = "c.pem"\nlisten = "nowhere"\n[database]\nurl = "mysql://x"\n')
    text = "\n".join(exc.value.problems)
    assert "tls_cert and tls_key" in text
    assert "listen = 'nowhere'" in text
    assert "postgresql://" in text


def test_a_postgresql_pool_smaller_than_a_workers_threads_is_refused(tmp_path: Path) -> None:
    pg = '[database]\nurl = "postgresql://u@127.0.0.1/d"\n'
    with pytest.raises(ConfigError, match=r"max_connections = 4 is too small for \[queue\] concurrency = 4; allowed: at least .* = 6"):
        _load(tmp_path, pg + "max_connections = 4\n")
    assert _load(tmp_path, pg + "max_connections = 6\n").database.max_connections == 6
    assert _load(tmp_path, "[database]\nmax_connections = 1\n").database.url == ""  # SQLite has no pool


def test_rate_limit_zones_validate_nested_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rate"):
        _load(tmp_path, '[[rate_limits.zones]]\nname = "z"\nprefixes = ["/"]\nrate = "fast"\n')
    cfg = _load(tmp_path, '[[rate_limits.zones]]\nname = "z"\nprefixes = ["/x"]\nrate = "3/m"\n')
    assert [z.name for z in cfg.rate_limits.zones] == ["z"]


def test_json_round_trip_for_children(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "[api]\nthreads = 3\n")
    again = Config.from_json(cfg.to_json())
    assert again == cfg


def test_committed_sample_matches_the_schema() -> None:
    """appliance.toml in the repo is generated from the config classes; regenerate with `python -m appliance.config`."""
    assert (ROOT / "appliance.toml").read_text() == config.render_sample()


def test_readme_table_matches_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config.render_markdown_table() in readme, "README config table drifted; regenerate with `python -m appliance.config --markdown`"


def test_sample_is_a_valid_config(tmp_path: Path) -> None:
    cfg = _load(tmp_path, config.render_sample())
    assert cfg.rate_limits.zones[0].name == "login"


def test_duplicate_zone_names_are_refused(tmp_path: Path) -> None:
    zone = '[[rate_limits.zones]]\nname = "z"\nprefixes = ["/x"]\n'
    with pytest.raises(ConfigError, match="zone name 'z' is used more than once"):
        _load(tmp_path, zone + zone)
