"""What one headless locust run says, from its CSV files, with every failure labelled by why it happened.

locust counts any answer of 400 or above as a failure, and a request that got
no HTTP answer at all (refused or reset connection, timeout) too. The labels
keep them apart:

- intended: a 429 from a rate-limit zone of the config (the zones whose prefix
  and methods match the request are named; the appliance's own counter of
  refusals per zone is shown beside it);
- after a refused login: a 401 from a user whose one login (the locustfile logs
  in once, on start) was refused, so it runs without a token;
- unexpected: any other HTTP status;
- locust's own: no HTTP answer (the exception locust recorded).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INTENDED, AFTER_LOGIN, UNEXPECTED, CLIENT = "intended", "after a refused login", "unexpected", "locust's own"
KINDS = (INTENDED, AFTER_LOGIN, UNEXPECTED, CLIENT)
LOGIN = "/auth/login"
_HTTP = re.compile(r"\b([1-5]\d\d) (?:Client|Server) Error\b")  # requests' raise_for_status text, which locust records
_EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*\(")


@dataclass
class Failure:
    """One line of locust's failures CSV and what it means."""

    method: str
    name: str
    error: str
    count: int
    status: int | None  # the HTTP status, None when there was no HTTP answer
    kind: str = ""
    label: str = ""


@dataclass
class Run:
    """The aggregated numbers of one run and its labelled failures."""

    users: int
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    reasons: list[Failure] = field(default_factory=list)
    refused_by_zone: dict[str, int] = field(default_factory=dict)  # the appliance's own counters
    logins: int = 0  # POST /auth/login requests and the slowest (bcrypt at start: the tail of a short run)
    login_max: float = float("nan")

    def count(self, kind: str) -> int:
        return sum(f.count for f in self.reasons if f.kind == kind)


def http_status(error: str) -> int | None:
    """The HTTP status in a locust error text ("HTTPError('429 Client Error: Too Many Requests for url: ...')"), else None."""
    m = _HTTP.search(error)
    return int(m.group(1)) if m else None


def exception_name(error: str) -> str:
    """The exception type of a locust error text without an HTTP status ("ConnectionRefusedError(111, ...)" -> its name)."""
    m = _EXCEPTION.match(error)
    return m.group(1).rsplit(".", 1)[-1] if m else error.strip()[:60] or "unknown error"


def matching_zones(zones: Iterable[Any], method: str, path: str) -> list[str]:
    """Names of the rate-limit zones whose prefixes and methods cover this request (zones: objects with name, prefixes, methods)."""
    out = []
    for z in zones:
        if z.methods and method.upper() not in {m.upper() for m in z.methods}:
            continue
        if any(path.startswith(p) for p in z.prefixes):
            out.append(z.name)
    return out


def label(failures: list[Failure], zones: Iterable[Any], refused_by_zone: dict[str, int] | None = None) -> list[Failure]:
    """Set kind and label on each failure (in place; also returned).

    A 429 is intended when a zone covers the request; of several, those the appliance counted refusals in are named.
    A 401 counts as after a refused login only if a login got a 429.
    """
    zones = list(zones)
    counted = {z for z, n in (refused_by_zone or {}).items() if n}
    login_refused = any(f.status == 429 and f.name == LOGIN for f in failures)
    for f in failures:
        if f.status is None:
            f.kind, f.label = CLIENT, f"no HTTP answer: {exception_name(f.error)}"
        elif f.status == 429 and (names := matching_zones(zones, f.method, f.name)):
            names = [n for n in names if n in counted] or names
            f.kind, f.label = INTENDED, f"429 from the rate limit (zone {' or '.join(names)})"
        elif f.status == 401 and login_refused and f.name != LOGIN:
            f.kind, f.label = AFTER_LOGIN, "401: no token, this user's login got the 429"
        else:
            f.kind, f.label = UNEXPECTED, f"HTTP {f.status}"
    return failures


def read_failures(path: Path) -> list[Failure]:
    """locust's <prefix>_failures.csv (Method, Name, Error, Occurrences); missing file: none."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        Failure(r["Method"], r["Name"], r["Error"], int(r["Occurrences"]), http_status(r["Error"]))
        for r in rows
        if int(r.get("Occurrences") or 0)
    ]


def read_run(prefix: Path, users: int, zones: Iterable[Any], refused_by_zone: dict[str, int] | None = None) -> Run:
    """The Aggregated row of <prefix>_stats.csv and the labelled lines of <prefix>_failures.csv."""
    with Path(f"{prefix}_stats.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    login = next((r for r in rows if r["Name"] == LOGIN and r["Type"] == "POST"), {})

    def num(key: str, row: dict[str, str] = agg) -> float:
        value = row.get(key) or "nan"
        return float("nan") if value == "N/A" else float(value)

    failures = label(read_failures(Path(f"{prefix}_failures.csv")), zones, refused_by_zone)
    return Run(
        users=users,
        requests=int(agg["Request Count"]),
        failures=int(agg["Failure Count"]),
        rps=num("Requests/s"),
        p50=num("50%"),
        p95=num("95%"),
        p99=num("99%"),
        reasons=sorted(failures, key=lambda f: (KINDS.index(f.kind), -f.count)),
        refused_by_zone=dict(refused_by_zone or {}),
        logins=int(login.get("Request Count") or 0),
        login_max=num("100%", login),
    )


def refused_counts(exposition: str) -> dict[str, int]:
    """zone -> requests refused, from the appliance's Prometheus text (appliance_balancer_rate_limited_total{zone=...})."""
    out: dict[str, int] = {}
    for m in re.finditer(r'^appliance_balancer_rate_limited_total\{[^}]*zone="([^"]+)"[^}]*\}\s+([0-9.e+]+)\s*$', exposition, re.M):
        out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
    return out


HEADING = "## Locust: the reference design's load test"


def render(runs: list[Run], header: list[str], notes: list[str]) -> str:
    """The Markdown section: a table of runs (one column per kind of failure), the reasons of each, notes."""
    out = [HEADING, "", *[f"- {h}" for h in header], ""]
    out += [
        "| users | requests | failures | req/s | p50 / p95 / p99 | intended: 429 rate limit | 401 after a refused login "
        "| unexpected HTTP errors | locust's own (no HTTP answer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        out.append(
            f"| {r.users} | {r.requests:,} | {r.failures:,} | {r.rps:.1f} | {r.p50:.0f} / {r.p95:.0f} / {r.p99:.0f} ms "
            f"| {r.count(INTENDED):,} | {r.count(AFTER_LOGIN):,} | {r.count(UNEXPECTED):,} | {r.count(CLIENT):,} |"
        )
    out.append("")
    for r in runs:
        zones = ", ".join(f"{z} {n:,}" for z, n in sorted(r.refused_by_zone.items())) or "none"
        reasons = "; ".join(f"{f.count:,} × {f.method} {f.name}: {f.label}" for f in r.reasons) or "none"
        logins = f" Logins: {r.logins}, the slowest {r.login_max:,.0f} ms (bcrypt, all at the start)." if r.logins else ""
        out.append(
            f"- {r.users} users, failures by reason: {reasons}. Refused by the appliance's rate-limit zones (its own counter): {zones}.{logins}"
        )
    out += [*[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def splice(document: str, section: str) -> str:
    """`document` with its locust section (HEADING up to the next level-1/2 heading) replaced by `section`, or it appended."""
    lines = document.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if start is None:
        return document.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n" if document.strip() else section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    kept = lines[:start] + section.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines) else [])
    return "\n".join(kept).rstrip("\n") + "\n"
