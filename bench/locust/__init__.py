"""`python -m bench locust`: the reference design's locust load test against `appliance run` on the default config.

- locustfile.py: the reference's tests/load/locustfile.py (credentials from the environment)
- run.py: a fresh appliance per user count, locust headless and bounded, the section of bench/results/latest.md
- summary.py: locust's CSV files read, each failure labelled (intended 429, 401 after it, unexpected, locust's own)
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from bench.locust.run import main as run

    return run(argv)
