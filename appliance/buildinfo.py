"""What this appliance is: version, git commit, build date, Python, frozen or not, bundled dependencies.

The one-file build writes appliance/_buildinfo.py (COMMIT, BUILD_DATE; packaging/build.py,
not committed); a source checkout has no such module and asks git for its commit instead.
`appliance version` prints this; `appliance version --json` for machines.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance import __version__

# The runtime dependencies (pyproject.toml [project] dependencies), by distribution name.
DEPENDENCIES = (
    "falcon",
    "waitress",
    "peewee",
    "pyjwt",
    "bcrypt",
    "huey",
    "redis",
    "psycopg2-binary",
    "psutil",
    "httptools",
    "uvloop",
    "msgspec",
    "orjson",
    "pyotp",
    "croniter",
    "cryptography",
    "prometheus-client",
    "tomli-w",
    "google-re2",
)


def _baked() -> tuple[str | None, str | None]:
    try:
        module = importlib.import_module("appliance._buildinfo")
    except ImportError:
        return None, None
    return getattr(module, "COMMIT", None), getattr(module, "BUILD_DATE", None)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dependency_versions() -> dict[str, str | None]:
    """Installed (or bundled) version of each runtime dependency; None when missing."""
    versions: dict[str, str | None] = {}
    for name in DEPENDENCIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def info() -> dict[str, Any]:
    commit, built = _baked()
    frozen = bool(getattr(sys, "frozen", False))
    return {
        "version": __version__,
        "commit": commit or _git_commit() or "unknown",
        "build_date": built,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "frozen": frozen,
        "platform": f"{platform.system().lower()}-{platform.machine()}",
        "dependencies": dependency_versions(),
    }


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"appliance {doc['version']}",
        f"commit      {doc['commit']}",
        f"built       {doc['build_date'] or 'not built (running from source)'}",
        f"python      {doc['python']} ({doc['implementation']}, {doc['platform']})",
        f"frozen      {'yes (one-file binary)' if doc['frozen'] else 'no'}",
        "dependencies:",
    ]
    lines += [f"  {name:<18} {version or 'missing'}" for name, version in doc["dependencies"].items()]
    return "\n".join(lines)
