"""The built one-file binary (dist/appliance, or $APPLIANCE_BINARY); missing it fails under CI=true, else skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def binary() -> Path:
    path = Path(os.environ.get("APPLIANCE_BINARY") or ROOT / "dist" / "appliance")
    if not (path.is_file() and os.access(path, os.X_OK)):
        message = f"the one-file binary {path} is missing; build it with `make binary`"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the e2e tests must run)", pytrace=False)
        pytest.skip(message)
    return path
