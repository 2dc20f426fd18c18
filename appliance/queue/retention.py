"""Upload retention: files uploaded for processing are deleted [api] upload_retention_hours later.

Run by the scheduler (one per host, in the monitor's process or its own; appliance.queue.scheduler
calls `sweep` every SWEEP_EVERY seconds, first at its start). An upload is due when it is older than the
retention and no queued, running or retrying task names it (`upload_id` of csv_profile and
other processing types, `source_file_id` of bulk_import): a task still waiting for its file
keeps it. A due upload loses its file (its folder under <data_dir>/uploads) and its row, so
it no longer counts against its owner's [api] user_upload_quota_bytes.

Several hosts share one database but each keeps its uploads in its own data dir: a host
deletes the rows it finds due, whoever's they are, and the files in its own uploads folder
whose row is gone (or was never written: an upload cut off mid-stream) once they are older
than the retention. So every file is removed by the host holding it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from appliance.db.models import Task, Upload
from appliance.logs import fields
from appliance.tasks.quotas import PENDING
from appliance.times import utcnow

log = logging.getLogger(__name__)

SWEEP_EVERY = 600.0
BATCH = 500
_KEYS = ("upload_id", "source_file_id")


def _in_use() -> set[str]:
    """Upload ids named by tasks that have not finished."""
    used: set[str] = set()
    for task in Task.select(Task.input).where(Task.status.in_(PENDING)).iterator():
        data = task.input if isinstance(task.input, dict) else {}
        used.update(str(data[k]) for k in _KEYS if isinstance(data.get(k), str))
    return used


def _remove(up: Any, root: Path) -> None:
    path = Path(up.path)
    try:
        if path.parent.parent == root and path.parent.name == up.id:  # <uploads>/<id>/<name>: the whole folder
            shutil.rmtree(path.parent, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("an expired upload could not be removed", extra=fields(upload_id=up.id, error=str(exc)))


def sweep(cfg: Any, now: _dt.datetime | None = None) -> dict[str, int]:
    """Delete uploads past their retention (see module docstring); what was removed."""
    done = {"uploads": 0, "bytes": 0, "orphans": 0}
    hours = cfg.api.upload_retention_hours
    if not hours:
        return done
    now = now or utcnow()
    cutoff = now - _dt.timedelta(hours=hours)
    root = cfg.path("uploads").resolve()
    used = _in_use()
    due = [up for up in Upload.select().where(Upload.created_at < cutoff).order_by(Upload.created_at).limit(BATCH) if up.id not in used]
    for up in due:
        _remove(up, root)
        if Upload.delete().where(Upload.id == up.id).execute():
            done["uploads"] += 1
            done["bytes"] += int(up.size or 0)
    done["orphans"] = _sweep_orphans(root, cutoff, used)
    if done["uploads"] or done["orphans"]:
        log.info("expired uploads removed", extra=fields(**done))
    return done


def _sweep_orphans(root: Path, cutoff: _dt.datetime, used: set[str]) -> int:
    """Folders of this host's uploads folder without a row, older than the retention."""
    if not root.is_dir():
        return 0
    oldest = cutoff.replace(tzinfo=_dt.UTC).timestamp()
    folders = [p for p in root.iterdir() if p.is_dir() and p.name not in used and p.stat().st_mtime < oldest][:BATCH]
    if not folders:
        return 0
    known = {u.id for u in Upload.select(Upload.id).where(Upload.id.in_([p.name for p in folders]))}
    removed = 0
    for folder in folders:
        if folder.name not in known:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class Sweeper:
    """Calls `sweep` at most every `every` seconds (monotonic); never raises into its caller."""

    def __init__(self, cfg: Any, every: float = SWEEP_EVERY, clock: Any = time.monotonic):
        self.cfg = cfg
        self.every = every
        self.clock = clock
        self.next = 0.0

    def __call__(self) -> None:
        if self.clock() < self.next:
            return
        self.next = self.clock() + self.every
        try:
            sweep(self.cfg)
        except Exception:
            log.exception("upload retention sweep failed; trying again later")
