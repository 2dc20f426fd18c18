"""bench/locust/summary.py: locust's CSV files read and every failure labelled (intended 429, 401 after it, unexpected, locust's own)."""

from __future__ import annotations

import csv
from pathlib import Path

from appliance.config import RateLimitZone
from bench.locust import summary

ZONES = [
    RateLimitZone(name="login", prefixes=["/auth/login", "/auth/register"], methods=["POST"], key="address", rate="5/m", burst=5),
    RateLimitZone(name="api", prefixes=["/api/", "/tasks", "/auth/"], key="user", rate="20/s", burst=60),
]
STATS_HEADER = "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"


def _write_run(prefix: Path, failures: list[tuple[str, str, str, int]]) -> None:
    Path(f"{prefix}_stats.csv").write_text(
        STATS_HEADER
        + "\nGET,/health/ping,300,0,3,4,1,90,60,5.0,0.0,3,4,4,5,6,8,12,20,90,90,90"
        + "\nPOST,/auth/login,20,14,4,500,1,2600,60,0.3,0.2,1900,2000,2100,2200,2400,2500,2600,2600,2600,2600,2600"
        + "\n,Aggregated,1200,61,4,9.5,1,1100,120,20.25,1.0,4,5,6,7,9,19,300,1100,1100,1100,1100\n"
    )
    with open(f"{prefix}_failures.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Method", "Name", "Error", "Occurrences", "First Seen", "Last Seen"])
        for method, name, error, n in failures:
            w.writerow([method, name, error, n, "2026-12-02T01:06:57Z", "2026-12-02T01:06:58Z"])


def test_http_status_is_read_from_the_error_text_and_connection_errors_have_none():
    assert summary.http_status("HTTPError('429 Client Error: Too Many Requests for url: /auth/login')") == 429
    assert summary.http_status("HTTPError('502 Server Error: Bad Gateway for url: /api/status')") == 502
    assert summary.http_status("ConnectionRefusedError(111, 'Connection refused')") is None
    assert summary.http_status("RemoteDisconnected('Remote end closed connection without response')") is None
    assert summary.exception_name("ConnectionRefusedError(111, 'Connection refused')") == "ConnectionRefusedError"
    assert summary.exception_name("urllib3.exceptions.ReadTimeoutError('x')") == "ReadTimeoutError"


def test_zones_match_by_prefix_and_method():
    assert summary.matching_zones(ZONES, "POST", "/auth/login") == ["login", "api"]
    assert summary.matching_zones(ZONES, "GET", "/auth/login") == ["api"]
    assert summary.matching_zones(ZONES, "GET", "/health/ping") == []


def test_a_run_is_read_and_its_failures_are_told_apart(tmp_path: Path):
    prefix = tmp_path / "locust"
    _write_run(
        prefix,
        [
            ("POST", "/auth/login", "HTTPError('429 Client Error: Too Many Requests for url: /auth/login')", 14),
            ("GET", "/api/users", "HTTPError('401 Client Error: Unauthorized for url: /api/users')", 30),
            ("GET", "/health/ping", "HTTPError('429 Client Error: Too Many Requests for url: /health/ping')", 2),
            ("GET", "/api/status", "HTTPError('502 Server Error: Bad Gateway for url: /api/status')", 3),
            ("GET", "/api/status", "ConnectionRefusedError(111, 'Connection refused')", 12),
            ("GET", "/tasks/stats", "HTTPError('401 Client Error: Unauthorized for url: /tasks/stats')", 0),
        ],
    )
    run = summary.read_run(prefix, 20, ZONES, {"login": 14, "api": 0})
    assert (run.users, run.requests, run.failures, run.rps, run.p50, run.p95, run.p99) == (20, 1200, 61, 20.25, 4, 19, 1100)
    assert (run.logins, run.login_max) == (20, 2600)
    assert run.count(summary.INTENDED) == 14
    assert run.count(summary.AFTER_LOGIN) == 30
    assert run.count(summary.UNEXPECTED) == 2 + 3  # a 429 no zone covers is not the config's doing
    assert run.count(summary.CLIENT) == 12
    assert len(run.reasons) == 5  # lines with no occurrences are left out
    login = next(f for f in run.reasons if f.name == "/auth/login")
    assert login.label == "429 from the rate limit (zone login)"  # of login and api, the appliance counted refusals in login
    assert [f.kind for f in run.reasons] == sorted((f.kind for f in run.reasons), key=summary.KINDS.index)


def test_a_401_without_a_refused_login_is_unexpected(tmp_path: Path):
    failures = [summary.Failure("GET", "/api/protected", "HTTPError('401 Client Error: Unauthorized for url: /api/protected')", 5, 401)]
    assert summary.label(failures, ZONES)[0].kind == summary.UNEXPECTED


def test_refused_counts_are_read_from_the_exposition():
    text = (
        "# HELP appliance_balancer_rate_limited_total requests refused by a rate-limit zone\n"
        "# TYPE appliance_balancer_rate_limited_total counter\n"
        'appliance_balancer_rate_limited_total{zone="login"} 14.0\n'
        'appliance_balancer_rate_limited_total{zone="api"} 0.0\n'
        'appliance_balancer_requests_total{zone="login"} 3.0\n'
    )
    assert summary.refused_counts(text) == {"login": 14, "api": 0}


def test_the_section_is_rendered_and_replaces_an_earlier_one():
    run = summary.Run(5, 640, 0, 10.7, 5, 20, 40)
    section = summary.render([run], ["date: now"], ["a note"])
    assert section.startswith(summary.HEADING)
    assert "| 5 | 640 | 0 | 10.7 | 5 / 20 / 40 ms | 0 | 0 | 0 | 0 |" in section
    stack = "# Appliance vs the reference stack\n\n| scenario | appliance |\n|---|---|\n| x | y |\n"
    once = summary.splice(stack, section)
    assert once.startswith(stack) and once.count(summary.HEADING) == 1
    again = summary.splice(once.replace("10.7", "9.9"), summary.render([summary.Run(5, 1, 0, 1.0, 1, 1, 1)], [], []))
    assert again.count(summary.HEADING) == 1 and "10.7" not in again and "9.9" not in again and again.startswith(stack)
    after = summary.splice(once + "\n## Later section\n\nkept\n", section)
    assert after.endswith("## Later section\n\nkept\n") and after.count(summary.HEADING) == 1
    assert summary.splice("", section) == section.rstrip("\n") + "\n"
