"""Build dist/appliance, the one-file executable: `python packaging/build.py` (what `make binary` runs).

Before PyInstaller runs, the build's identity (git commit, UTC build date) is written to
appliance/_buildinfo.py, which the binary bundles and `appliance version` reads; the file is
removed afterwards (it is not committed), so a source checkout reports its commit from git.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILDINFO = ROOT / "appliance" / "_buildinfo.py"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return out + ("-dirty" if dirty.stdout.strip() else "")


def write_buildinfo() -> None:
    date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():  # reproducible builds pin the date
        date = dt.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), dt.UTC).isoformat().replace("+00:00", "Z")
    BUILDINFO.write_text(f'"""Written by packaging/build.py; not committed."""\n\nCOMMIT = {git_commit()!r}\nBUILD_DATE = {date!r}\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default=str(ROOT / "dist"), help="where the binary goes (default dist/)")
    args = parser.parse_args(argv)
    write_buildinfo()
    try:
        cmd = [
            sys.executable,
            "-m",
            "PyInstaller",
            "--noconfirm",
            "--clean",
            "--log-level",
            "WARN",
            "--distpath",
            args.dist,
            "--workpath",
            str(ROOT / "build" / "pyinstaller"),
            str(ROOT / "packaging" / "appliance.spec"),
        ]
        status = subprocess.call(cmd, cwd=ROOT)
    finally:
        BUILDINFO.unlink(missing_ok=True)
    if status == 0:
        binary = Path(args.dist) / "appliance"
        print(f"built {binary} ({binary.stat().st_size / 1e6:.1f} MB)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
