"""The reference design's own load test through a real `appliance run` (balancer included) with the
default rate-limit zones: one user, 10 threads, 50 /tasks/submit at once, at least 45 accepted
(../shared/seeds, test_concurrent_task_submission). The login zone must still stop a flood, and a
body nested past the depth bound is refused end to end."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from appliance.config import RateLimitSettings
from tests.integration.supervised import Appliance, http_json

pytestmark = pytest.mark.slow

PASSWORD = "load-test-password-1"


def test_fifty_parallel_submits_pass_the_default_zones_while_a_login_flood_is_cut(tmp_path):
    app = Appliance(tmp_path, api_workers=2, task_workers=1)
    assert "rate_limits" not in app.sections  # the defaults, as a fresh install has them
    app.start()
    try:
        # an ordinary account (the reference logs in as admin; admins are exempt from the pending-task quota)
        status, _ = http_json(app.port, "POST", "/auth/register", {"username": "loader", "email": "l@example.com", "password": PASSWORD})
        assert status == 200
        status, body = http_json(app.port, "POST", "/auth/login", {"username": "loader", "password": PASSWORD})
        assert status == 200, body
        token = body["data"]["access_token"]

        def submit(i: int) -> int:
            return http_json(app.port, "POST", "/tasks/submit", {"task_type": "sample", "data": {"test_id": i}}, token=token)[0]

        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(submit, range(50)))
        assert sum(1 for s in results if s == 200) >= 45, results  # the reference's own bound
        assert results.count(200) == 50, results  # and in fact all: 50 fit in the default burst

        # nesting deeper than [api] json_max_depth is a 400 through the balancer too (255 levels were a 500)
        deep = {"task_type": "sample", "data": {"v": orjson.loads(b"[" * 255 + b"]" * 255)}}
        status, body = http_json(app.port, "POST", "/tasks/submit", deep, token=token)
        assert status == 400 and body["error"]["code"] == "json_too_deep", body

        # password guessing from one address is still refused within a handful of tries
        statuses = [http_json(app.port, "POST", "/auth/login", {"username": "loader", "password": f"wrong-{i}"})[0] for i in range(8)]
        assert 429 in statuses, statuses
        assert statuses.index(429) <= 5, statuses  # register + login + at most 4 more in the 5/min, burst 5 zone
    finally:
        app.stop()


def test_default_zones_are_what_the_help_line_says():
    zones = {z.name: z for z in RateLimitSettings().zones}
    assert (zones["login"].rate, zones["login"].burst, zones["login"].key) == ("5/m", 5, "address")
    assert (zones["api"].rate, zones["api"].burst, zones["api"].key) == ("20/s", 60, "user")
