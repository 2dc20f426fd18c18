"""The compat suite: the reference design's own API tests against a real `appliance run`.

One appliance per session on the default config (two api workers, as on a
2-core host), with the example operator task types of examples/tasks loaded
([queue] tasks_dir), reached through its balancer on a free loopback port.

Credentials: the reference tests log in as admin / admin123, a default
password; the appliance has no default account (a known password is the first
thing an attacker tries). The `compat_admin` fixture creates an admin with a
fresh random password through the CLI (`appliance user create --admin`) and
the tests' client logs in with it. The login zone of the balancer (5/min per
address, a defence against password guessing) stays on: the client logs in
once per session and reuses that token, as a real client would.

The api zone (20/s per user, burst 60) stays on too. The reference tests were
written one at a time: test_concurrent_task_submission and
test_database_transaction_integrity together spend the burst, and
test_response_time_sla then sends its requests back to back. So each test
starts with the admin's bucket full again (`wait_for_full_bucket`), as it
would when run alone; a test never waits inside itself.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.integration.supervised import Appliance

EXAMPLE_TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "performance: the reference design's response-time SLA (runs in the compat suite)")


@dataclass
class CompatAdmin:
    base_url: str
    username: str
    password: str
    token: str
    refill_seconds: float

    def wait_for_full_bucket(self) -> None:
        """Sleep until the admin's api-zone bucket has refilled (burst / rate), if a test may have spent it."""
        time.sleep(self.refill_seconds)


@pytest.fixture(scope="session")
def compat_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("compat"), api_workers=2, task_workers=1, queue={"tasks_dir": str(EXAMPLE_TASKS)})
    app.start()
    try:
        yield app
    finally:
        assert app.stop() == 0, app.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def compat_admin(compat_appliance: Appliance) -> CompatAdmin:
    name, password = "compat_admin", "Cp-" + secrets.token_urlsafe(18)
    r = compat_appliance.cli("user", "create", name, "--admin", "--password-stdin", stdin=password + "\n")
    assert r.returncode == 0, r.stdout + r.stderr
    base = f"http://127.0.0.1:{compat_appliance.port}"
    login = requests.post(f"{base}/auth/login", json={"username": name, "password": password}, timeout=30)
    assert login.status_code == 200, login.text
    from appliance.balancer.limiter import parse_rate
    from appliance.config import load_config

    zone = next(z for z in load_config(compat_appliance.config, env={}).rate_limits.zones if z.name == "api")
    refill = (zone.burst + 1) / parse_rate(zone.rate) + 0.5
    return CompatAdmin(base, name, password, login.json()["data"]["access_token"], refill)
