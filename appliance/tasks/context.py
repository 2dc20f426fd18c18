"""What task code sees while it runs: progress, logs, cancellation, the attempt number.

`progress()` and `cancelled()` are the cancellation points: a cancel request
stored in the task row is noticed there (the row is read at most every
CHECK_INTERVAL seconds, so tight loops stay cheap) and `progress()` raises
TaskCancelled, which the runner records as a cancelled task. `log()` lines go
to the task_log table (batched with history rows by appliance.tasks.records).
"""

from __future__ import annotations

import logging
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
    ):
        self.task_id = task_id
        self.attempt = attempt
        self.task_type = task_type
        self.owner_id = owner_id
        self.previous_result = previous_result
        self.cfg = cfg
        self._on_progress = on_progress
        self._clock = clock
        self._checked_at = -1e9
        self._cancel = False
        self.percentage = 0.0

    def log(self, line: str, level: str = "info") -> None:
        """Append one line to the task's log (GET /tasks/logs/{id})."""
        from appliance.tasks import records

        records.add_log(self.task_id, str(line), level)

    def progress(self, percentage: float, message: str = "") -> None:
        """Record progress (0-100); a cancellation point."""
        from appliance.tasks import lifecycle

        pct = max(0.0, min(100.0, float(percentage)))
        self.percentage = pct
        cancel = lifecycle.set_progress(self.task_id, self.attempt, pct, str(message)[:500])
        self._checked_at = self._clock()
        if cancel:
            self._cancel = True
        if self._on_progress is not None:
            try:
                self._on_progress(pct, message)
            except Exception:  # callbacks never fail a task
                log.exception("progress hook failed")
        if self._cancel:
            raise TaskCancelled("cancelled on request")

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
