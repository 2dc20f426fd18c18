"""schemathesis against a live worker's /openapi.json: zero server errors, zero schema violations.

Bounded: a fixed number of examples per operation, deterministic generation,
two concurrent test workers, so the run stays well under 90 s. Routes that would
revoke the test's own token (logout, logout-all, password, mfa/disable) are left
out; they are walked by test_api_worker and test_api_auth.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.api_support import PASSWORD, bearer, start_worker, worker_config

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "apps"
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_schemathesis_finds_no_server_errors_or_schema_violations(tmp_path):
    cfg = worker_config(tmp_path / "data", api={"apps_dir": str(EXAMPLES)})
    w = start_worker(cfg)
    try:
        from appliance import accounts, db
        from appliance.config import load_config

        handle = db.open_database(load_config(cfg, env={}))
        accounts.create_user("stadmin", None, PASSWORD, role="admin", rounds=10)
        handle.close()
        token = w.post("/auth/login", json={"username": "stadmin", "password": PASSWORD}).json()["data"]["access_token"]
        cli = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run(
            [
                str(cli),
                "run",
                w.url + "/openapi.json",
                "--max-examples",
                "15",
                "--checks",
                CHECKS,
                "--header",
                f"Authorization: Bearer {token}",
            ]
            + ["--exclude-path-regex", "^/auth/(logout|logout-all|password|mfa/disable)$", "--generation-deterministic", "--workers", "2"]
            + ["--phases", "examples,coverage,fuzzing", "--no-color", "--request-timeout", "20"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1].lower()
        # the token survived the run, so authenticated operations were really exercised
        assert requests.get(w.url + "/api/protected", headers=bearer(token), timeout=10).status_code == 200
    finally:
        assert w.stop() == 0, w.output()[-3000:]
