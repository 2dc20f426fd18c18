"""Stand-in loops for a hosted job (appliance/supervisor/roles.py JOBS), put in the scheduler's place by a test.

breaks: runs a moment, then an exception gets out of the thread, as no real loop should let happen.
"""

from __future__ import annotations

import threading
from typing import Any


def breaks(cfg: Any, stop: threading.Event) -> None:
    stop.wait(1.0)
    raise RuntimeError("the stand-in loop broke")
