"""What task code sees while it runs: progress, logs, cancellation, the attempt number.

`progress()` and `cancelled()` are the cancellation points: a cancel request
stored in the task row is noticed there (the row is read at most every
CHECK_INTERVAL seconds, so tight loops stay cheap) and `progress()` raises
TaskCancelled, which the runner records as a cancelled task. Progress is written
at most every CHECK_INTERVAL too: a call sooner after the last write (or the
claim, which read the row) is held, and written by the next call after that,
by the runner's last update of the attempt, or by this process's record
flusher within records.FLUSH_INTERVAL, whichever comes first; a task that
reports progress right before it returns costs no write of its own. `log()` lines go
to the task_log table (batched with history rows by appliance.tasks.records).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.db.models import Task

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.25


class TaskCancelled(Exception):
    """Raised inside task code at a cancellation point after a cancel request."""


class TaskContext:
    """Handed to every task function as its first argument."""

    def __init__(
        self,
        task_id: str,
        attempt: int,
        *,
        task_type: str = "",
        owner_id: int | None = None,
        previous_result: Any = None,
        cfg: Any = None,
        on_progress: Callable[[float, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        claimed: bool = False,
    ):
        self.task_id = task_id
        self.attempt = attempt
        self.task_type = task_type
        self.owner_id = owner_id
        self.previous_result = previous_result
        self.cfg = cfg
        self._on_progress = on_progress
        self._clock = clock
        # the claim (`claimed`) has just read the row: it was not being cancelled then
        self._checked_at = clock() if claimed else -1e9
        self._cancel = False
        self.percentage = 0.0
        self._held: tuple[float, str] | None = None  # progress not written yet
        self._write_lock = threading.Lock()  # this task's thread and the record flusher write it

    def log(self, line: str, level: str = "info") -> None:
        """Append one line to the task's log (GET /tasks/logs/{id})."""
        from appliance.tasks import records

        records.add_log(self.task_id, str(line), level)

    def progress(self, percentage: float, message: str = "") -> None:
        """Record progress (0-100); a cancellation point."""
        from appliance.tasks import lifecycle, records

        pct = max(0.0, min(100.0, float(percentage)))
        text = str(message)[:500]
        self.percentage = pct
        newly_held = False
        with self._write_lock:
            now = self._clock()
            if now - self._checked_at < CHECK_INTERVAL:
                newly_held = self._held is None
                self._held = (pct, text)
            else:
                self._held = None
                if lifecycle.set_progress(self.task_id, self.attempt, pct, text):
                    self._cancel = True
                self._checked_at = now
        if newly_held:
            records.hold_progress(self)
        if self._on_progress is not None:
            try:
                self._on_progress(pct, message)
            except Exception:  # callbacks never fail a task
                log.exception("progress hook failed")
        if self._cancel:
            raise TaskCancelled("cancelled on request")

    def write_held(self) -> None:
        """Write held progress now, if any (the record flusher; the runner before it records a failure)."""
        from appliance.tasks import lifecycle

        with self._write_lock:
            held, self._held = self._held, None
            if held is not None:
                if lifecycle.set_progress(self.task_id, self.attempt, *held):
                    self._cancel = True
                self._checked_at = self._clock()

    def take_held(self) -> tuple[float, str] | None:
        """The progress held unwritten, which the caller now writes itself (the runner's final update)."""
        with self._write_lock:
            held, self._held = self._held, None
            return held

    def cancelled(self) -> bool:
        """True once a cancel was requested (cheap to call in a loop)."""
        if self._cancel:
            return True
        now = self._clock()
        if now - self._checked_at >= CHECK_INTERVAL:
            self._checked_at = now
            row = Task.select(Task.cancel_requested).where(Task.id == self.task_id).first()
            self._cancel = bool(row is None or row.cancel_requested)
        return self._cancel

    def check(self) -> None:
        """Raise TaskCancelled when a cancel was requested."""
        if self.cancelled():
            raise TaskCancelled("cancelled on request")

    def sleep(self, seconds: float, step: float = 0.2) -> None:
        """Sleep, checking for cancellation every `step` seconds."""
        end = self._clock() + seconds
        while True:
            self.check()
            left = end - self._clock()
            if left <= 0:
                return
            time.sleep(min(step, left))
