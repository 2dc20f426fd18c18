"""`appliance version`'s facts: baked in by the build, or found from source."""

from __future__ import annotations

import sys
import types

from appliance import __version__, buildinfo


def test_from_source_the_build_date_is_absent_and_every_dependency_is_named():
    doc = buildinfo.info()
    assert doc["version"] == __version__ and doc["frozen"] is False and doc["build_date"] is None
    assert set(doc["dependencies"]) == set(buildinfo.DEPENDENCIES) and all(doc["dependencies"].values())
    assert "not built (running from source)" in buildinfo.render(doc)


def test_the_build_module_wins(monkeypatch):
    baked = types.ModuleType("appliance._buildinfo")
    baked.COMMIT, baked.BUILD_DATE = "abc123", "2026-01-02T03:04:05Z"
    monkeypatch.setitem(sys.modules, "appliance._buildinfo", baked)
    doc = buildinfo.info()
    assert doc["commit"] == "abc123" and doc["build_date"] == "2026-01-02T03:04:05Z"
    assert "2026-01-02T03:04:05Z" in buildinfo.render(doc)
