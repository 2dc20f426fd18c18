"""appliance.onefile from source: what a start does with the unpacked dir a killed one-file start left behind."""

from __future__ import annotations

import sys

from appliance import onefile


def test_the_recorded_dir_of_a_killed_start_is_removed(tmp_path):
    left = tmp_path / "_MEI12345abcdef"
    (left / "lib").mkdir(parents=True)
    (left / "lib" / "x.so").write_bytes(b"\0")
    run = tmp_path / "run"
    run.mkdir()
    (run / onefile.RECORD).write_text(f"{left}\n")
    assert onefile.sweep_stale(run) == left
    assert not left.exists()
    assert not (run / onefile.RECORD).exists()  # from source there is no unpacked dir to record


def test_only_unpacked_dirs_are_ever_removed(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    for target in (precious, tmp_path / "_MEIgone", "relative/_MEIx"):
        (run / onefile.RECORD).write_text(f"{target}\n")
        assert onefile.sweep_stale(run) is None
    assert precious.is_dir()


def test_from_source_nothing_is_changed():
    env = {"LD_LIBRARY_PATH": "/x", "WATCHDOG_PID": "1"}
    assert onefile.bundle_dir() is None and not onefile.under_bootloader()
    assert onefile.external_env(env) == env and onefile.notify_env(env) == env
    onefile.detach_group()  # a no-op from source


def _frozen(monkeypatch, tmp_path):
    bundle = tmp_path / "_MEIabc"
    bundle.mkdir()
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(bundle), raising=False)
    return bundle


def test_programs_we_run_from_the_binary_get_the_hosts_library_path(monkeypatch, tmp_path):
    bundle = _frozen(monkeypatch, tmp_path)
    assert onefile.bundle_dir() == bundle
    env = {"LD_LIBRARY_PATH": str(bundle), "LD_LIBRARY_PATH_ORIG": "/opt/lib", "_PYI_APPLICATION_HOME_DIR": str(bundle), "PATH": "/bin"}
    assert onefile.external_env(env) == {"LD_LIBRARY_PATH": "/opt/lib", "PATH": "/bin"}
    assert onefile.external_env({"LD_LIBRARY_PATH": str(bundle), "PATH": "/bin"}) == {"PATH": "/bin"}


def test_a_one_file_start_records_its_unpacked_dir_for_the_next_start(monkeypatch, tmp_path):
    bundle = _frozen(monkeypatch, tmp_path)
    run = tmp_path / "run"
    assert onefile.sweep_stale(run) is None
    assert (run / onefile.RECORD).read_text().strip() == str(bundle)
    assert onefile.sweep_stale(run) is None and bundle.is_dir()  # its own dir is never removed


def test_the_unit_for_the_binary_lets_the_bootloaders_child_notify(make_config):
    from appliance.supervisor.unit import render

    cfg = make_config()
    assert "NotifyAccess=all" in render(cfg, executable="/usr/local/bin/appliance").splitlines()
    assert "NotifyAccess=main" in render(cfg).splitlines()  # from source systemd starts this interpreter itself
