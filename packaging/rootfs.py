"""Cached Debian root file systems for the packaging smoke tests (bare-host-smoke.py, systemd-smoke.py).

A root is made once with `debootstrap --variant=minbase` of Debian bookworm (through the mirror this
host's apt already uses), stored as a tarball in $APPLIANCE_CI_CACHE (default /var/cache/appliance-ci),
rebuilt when the tarball is missing, and unpacked afresh for each run. The tarball's suffix picks its
compression: `.tar.zst` (zstd, smaller and faster to unpack) or `.tar.gz`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("APPLIANCE_CI_CACHE") or "/var/cache/appliance-ci")
SUITE = "bookworm"


class RootfsError(RuntimeError):
    """The root could not be made or unpacked (the message says why)."""


def apt_mirror() -> str | None:
    """The Debian mirror this host's apt uses (so the scripts name none of their own)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                match = re.match(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?(\s|$)", line.strip())
                if match:
                    return match.group(1)
    return None


def apt_install(*packages: str, commands: Sequence[str] = ()) -> None:
    """apt-get install the packages unless every command in `commands` is already on PATH (update once if needed)."""
    if commands and all(shutil.which(c) for c in commands):
        return
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL, env=env)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def _tar_compression(tarball: Path) -> list[str]:
    return ["--zstd"] if tarball.name.endswith(".zst") else ["-z"]


def ensure_rootfs(tarball: Path, *, include: Sequence[str] = (), step: Callable[[str], None] = print, strip_apt: bool = False) -> Path:
    """The cached root tarball, made with debootstrap (minbase, plus `include`) when it is missing.

    strip_apt leaves apt's package cache and lists out of the tarball (they are only needed to install more).
    """
    if tarball.is_file():
        return tarball
    apt_install("debootstrap", commands=["debootstrap"])
    if tarball.name.endswith(".zst"):
        apt_install("zstd", commands=["zstd"])
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
        target = Path(tmp) / "root"
        mirror = apt_mirror()
        extra = [f"--include={','.join(include)}"] if include else []
        step(f"debootstrap --variant=minbase {' '.join(extra)} {SUITE} (once; cached in {tarball})")
        cmd = ["debootstrap", "--variant=minbase", *extra, SUITE, str(target), *([mirror] if mirror else [])]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RootfsError(f"debootstrap failed: {result.stderr[-2000:] or result.stdout[-2000:]}")
        excludes = ["--exclude=./var/cache/apt/archives/*.deb", "--exclude=./var/lib/apt/lists/*"] if strip_apt else []
        partial = tarball.with_name(tarball.name + ".partial")
        subprocess.run(["tar", "-C", str(target), *_tar_compression(tarball), *excludes, "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    return tarball


def unpack(tarball: Path, dest: Path) -> None:
    """Unpack a cached root tarball into dest (an existing, empty directory)."""
    subprocess.run(["tar", "-C", str(dest), *_tar_compression(tarball), "-xf", str(tarball)], check=True)
