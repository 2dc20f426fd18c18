"""Living inside PyInstaller's one-file binary: its bootloader, its unpacked dir, its environment.

How the one-file binary runs (PyInstaller 6 on Linux): the file's own process is the
bootloader; it unpacks the bundle into $TMPDIR/_MEIxxxxxx, starts Python as its child
(sys.executable is the file, sys._MEIPASS the unpacked dir), forwards SIGTERM, SIGHUP,
SIGINT... to it, waits, removes the unpacked dir and exits with the child's status.
Children the supervisor starts with sys.executable inherit _PYI_APPLICATION_HOME_DIR
and so reuse that dir: they neither unpack nor fork a bootloader of their own.

What this module adds, only when running from the one-file binary:
- detach_group(): the supervisor leaves the bootloader's process group, so a signal
  sent to the whole group (a terminal's Ctrl-C, `kill -TERM -PGID`) reaches it once,
  forwarded by the bootloader, not twice (a second SIGTERM means "kill everything now");
  and it asks the kernel for SIGTERM should the bootloader die (drain, do not orphan).
- sweep_stale(run_dir): a bootloader killed with SIGKILL cannot remove its unpacked
  dir; the supervisor records the dir it uses in run/, and the next start on the same
  data dir (holding the data dir's lock, so that appliance is gone) removes the old one.
- external_env(): the environment for programs that are not us (pg_dump): without the
  bootloader's LD_LIBRARY_PATH, which points them at our bundled libssl/libpq.
- notify_env(): systemd's WATCHDOG_PID names the main PID, the bootloader; the watchdog
  pings come from the supervisor, its child, so the watchdog is ours when it names our parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

RECORD = "bundle-dir"
PR_SET_PDEATHSIG = 1
_BOOTLOADER_ENV = ("_PYI_ARCHIVE_FILE", "_PYI_APPLICATION_HOME_DIR", "_PYI_PARENT_PROCESS_LEVEL", "_PYI_LINUX_PROCESS_NAME")


def bundle_dir() -> Path | None:
    """The one-file binary's unpacked dir, or None from source or a one-folder build."""
    meipass = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or not meipass:
        return None
    here = Path(meipass).resolve()
    return None if here == Path(sys.executable).resolve().parent else here


def under_bootloader() -> bool:
    """True when our parent is the one-file binary's bootloader (call it from `appliance run`: a child's parent is the supervisor)."""
    if bundle_dir() is None:
        return False
    try:
        return os.path.realpath(f"/proc/{os.getppid()}/exe") == os.path.realpath(sys.executable)
    except OSError:
        return False


def detach_group() -> None:
    if not under_bootloader():
        return
    parent = os.getppid()
    with contextlib.suppress(OSError):
        if os.getpgid(0) == os.getpgid(parent):
            os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _is_bundle_dir(path: Path) -> bool:
    return path.name.startswith("_MEI") and path.is_dir() and not path.is_symlink()


def sweep_stale(run_dir: Path) -> Path | None:
    """Remove the unpacked dir a killed bootloader left (recorded by the last start); record ours. Returns what was removed."""
    record = run_dir / RECORD
    removed = None
    with contextlib.suppress(OSError):
        previous = Path(record.read_text().strip())
        current = bundle_dir()
        if previous.is_absolute() and previous != current and _is_bundle_dir(previous):
            shutil.rmtree(previous, ignore_errors=True)
            removed = previous
            log.info("removed %s, left by a one-file start that was killed", previous, extra={"fields": {"removed": str(previous)}})
    current = bundle_dir()
    if current is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{current}\n")
    else:
        record.unlink(missing_ok=True)
    return removed


def external_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) fit for running another program than ourselves."""
    out = dict(os.environ if env is None else env)
    if bundle_dir() is None:
        return out
    original = out.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        out["LD_LIBRARY_PATH"] = original
    else:
        out.pop("LD_LIBRARY_PATH", None)
    for name in _BOOTLOADER_ENV:
        out.pop(name, None)
    return out


def notify_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the sd_notify code should read: WATCHDOG_PID of our bootloader counts as ours."""
    out = dict(os.environ if env is None else env)
    if under_bootloader() and out.get("WATCHDOG_PID") == str(os.getppid()):
        out["WATCHDOG_PID"] = str(os.getpid())
    return out
