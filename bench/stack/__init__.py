"""`python -m bench stack`: the appliance against the whole reference stack it replaces, in one table.

- reference.py: nginx (nginx.conf.tmpl) -> 3 gunicorn instances of refapp.py -> PostgreSQL; reftasks.py on Celery + beat, Redis
- ours.py: the appliance (`appliance run`) with the same process counts, on PostgreSQL + Redis or on SQLite
- scenarios.py: GET load (wrk), logins, tasks end to end, footprint, kill -9 of an api / task worker
- report.py: the Markdown table (bench/results/latest.md); run.py: the order of it all
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from bench.stack.run import main as run

    return run(argv)
