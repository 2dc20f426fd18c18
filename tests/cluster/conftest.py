"""The three-host cluster (tests/cluster/netns.py), once per module; missing root or tools fail under CI=true, else skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.netns import Cluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the cluster harness needs root (network namespaces, veth pairs)"
    for tool in ("ip", "setpriv", "redis-server"):
        if shutil.which(tool) is None:
            return f"the cluster harness needs {tool}"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "the cluster harness needs PostgreSQL's server binaries (/usr/lib/postgresql/*/bin)"
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    missing = _missing()
    if missing:
        if IN_CI:
            pytest.fail(missing + " (CI=true: make test-cluster must run)", pytrace=False)
        pytest.skip(missing)
    with Cluster() as c:
        yield c
