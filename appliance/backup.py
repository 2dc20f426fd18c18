"""`appliance backup` and `appliance restore`: one archive holding everything a data dir needs.

(Over 500 lines on purpose: backup and restore share the archive format, the manifest and its
checks; apart, each would have to restate what the other writes.)

How a backup is made (while the appliance runs; nothing is stopped):
- SQLite databases (the appliance's and the SQLite queue's) are copied with SQLite's
  online backup API, which reads a consistent snapshot, WAL content included;
- on PostgreSQL, `pg_dump --format=custom` of the server's own major version takes a
  consistent logical dump (one transaction); without a matching pg_dump the backup stops
  and names the package to install;
- uploads and appliance.toml are added as files; secrets.toml (and the TLS key) only with
  --with-secrets; manifest.json lists every file with its size and sha256.
The archive is a tar.gz written with mode 0600 (it holds password hashes) under a temporary
name and renamed when complete, so a failed backup never leaves a half archive.

How a restore goes: refuse while an appliance holds the data dir's lock; read the whole
archive into a staging dir beside the data dir and check the manifest (format, version,
schema, every checksum) before anything is touched; then move the current data dir aside
as `<data>.before-restore-<time>` (on PostgreSQL, with a dump of the current database in
it), put the staged one in its place, load the PostgreSQL dump, and run the migrations.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance import __version__, onefile

FORMAT = "appliance-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PG_DUMP_FILE = "database.pgdump"
SECRET_FILES = ("secrets.toml", "tls/key.pem")
# Runtime state of a running appliance, rebuilt at start: locks, sockets and heartbeats (run/), and
# the live mmap'd prometheus files (metrics/, emptied by the supervisor; they change while archived).
SKIPPED_DIRS = ("run", "metrics")


class BackupError(Exception):
    """A backup or restore that cannot go on; the message names what is wrong and what to do."""


# --- progress ---------------------------------------------------------------------------


class Progress:
    """Progress on stderr: a one-line bar on a terminal, plain lines otherwise (logs, pipes)."""

    def __init__(self, stream: Any = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def fraction(self, label: str, done: float) -> None:
        if self.quiet or not self.tty:
            return
        width = 30
        filled = int(width * min(max(done, 0.0), 1.0))
        end = "\n" if done >= 1.0 else ""
        self.stream.write(f"\r{label:<24} [{'#' * filled}{'.' * (width - filled)}] {done * 100:5.1f}%{end}")
        self.stream.flush()


# --- helpers ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sqlite_copy(src: Path, dst: Path, progress: Progress, label: str) -> None:
    """A consistent copy of a live SQLite database (WAL included) through the online backup API."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(
            target, pages=1024, progress=lambda _status, remaining, total: progress.fraction(label, 1 - remaining / max(total, 1))
        )
        progress.fraction(label, 1.0)
    finally:
        target.close()
        source.close()
    with contextlib.suppress(OSError):  # the copy is a single file: no WAL of its own
        os.chmod(dst, 0o600)


def pg_tool(name: str, server_major: int) -> str:
    """The pg_dump/pg_restore of the server's major version, or a BackupError naming what to install."""
    candidates = [f"/usr/lib/postgresql/{server_major}/bin/{name}"]  # Debian/Ubuntu keep one per major
    if found := shutil.which(name):
        candidates.append(found)
    seen = []
    for path in candidates:
        if not os.access(path, os.X_OK):
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, env=onefile.external_env()).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        major = int(match.group(1)) if match else 0
        if major == server_major:
            return path
        seen.append(f"{path} is version {major}")
    have = f" ({'; '.join(seen)})" if seen else ""
    raise BackupError(
        f"{name} of PostgreSQL {server_major} is needed for a PostgreSQL database{have}; "
        f"install it (Debian/Ubuntu: apt-get install postgresql-client-{server_major}) and try again"
    )


def pg_server_major(url: str) -> int:
    import psycopg2

    try:
        conn = psycopg2.connect(url, connect_timeout=10)
    except psycopg2.Error as exc:
        raise BackupError(f"cannot reach the PostgreSQL server of [database] url: {str(exc).strip()}") from None
    try:
        return conn.server_version // 10000
    finally:
        conn.close()


def pg_dump(url: str, target: Path) -> None:
    tool = pg_tool("pg_dump", pg_server_major(url))
    result = subprocess.run(
        [tool, "--format=custom", "--no-owner", "--no-privileges", "--file", str(target), "--dbname", url],
        capture_output=True,
        text=True,
        env=onefile.external_env(),
    )
    if result.returncode != 0:
        raise BackupError(f"pg_dump failed: {result.stderr.strip()[:500]}")


def pg_restore(url: str, dump: Path) -> None:
    """Replace the appliance's tables in the configured database with the dump's (one transaction)."""
    tool = pg_tool("pg_restore", pg_server_major(url))
    result = subprocess.run(
        [
            tool,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            "--dbname",
            url,
            str(dump),
        ],
        capture_output=True,
        text=True,
        env=onefile.external_env(),
    )
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed (the database is unchanged: it ran in one transaction): {result.stderr.strip()[:500]}")


def _data_files(data_dir: Path, skip: set[Path], with_secrets: bool) -> Iterator[tuple[Path, str]]:
    """(path, name in the archive) of the plain files of the data dir to back up."""
    for root, dirs, files in os.walk(data_dir):
        rel_root = Path(root).relative_to(data_dir)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = (rel_root / name).as_posix()
            if path in skip or name.endswith(("-wal", "-shm", "-journal")) or not path.is_file() or path.is_symlink():
                continue
            if rel in SECRET_FILES and not with_secrets:
                continue
            yield path, rel


# --- backup -----------------------------------------------------------------------------


def create(cfg: Any, target: Path, *, with_secrets: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write the backup archive of `cfg`'s data dir to `target`; returns the manifest."""
    from appliance import db

    progress = progress or Progress()
    data_dir = cfg.data_dir
    target = target.resolve()
    if target.is_relative_to(data_dir.resolve()):
        raise BackupError(f"{target} is inside the data dir {data_dir}; write the backup somewhere else")
    target.parent.mkdir(parents=True, exist_ok=True)
    engine = db.engine_name(cfg)
    queue = "redis" if cfg.redis.url else "sqlite"
    with tempfile.TemporaryDirectory(prefix=".appliance-backup-", dir=target.parent) as tmp:
        stage = Path(tmp)
        members: list[tuple[Path, str]] = []
        db_file = cfg.path(cfg.database.sqlite_file)
        queue_file = cfg.path("queue.db")
        if engine == "sqlite":
            if not db_file.exists():
                raise BackupError(f"no database at {db_file}; is this the data dir of an initialised appliance (`appliance init`)?")
            progress.step(f"copying the database {db_file.name} (SQLite online backup)")
            sqlite_copy(db_file, stage / "db.sqlite", progress, db_file.name)
            members.append((stage / "db.sqlite", _archive_name(data_dir, db_file)))
        else:
            progress.step("dumping the PostgreSQL database with pg_dump")
            pg_dump(cfg.database.url, stage / PG_DUMP_FILE)
            members.append((stage / PG_DUMP_FILE, PG_DUMP_FILE))
        if queue == "sqlite" and queue_file.exists():
            progress.step("copying the task queue queue.db (SQLite online backup)")
            sqlite_copy(queue_file, stage / "queue.sqlite", progress, "queue.db")
            members.append((stage / "queue.sqlite", _archive_name(data_dir, queue_file)))
        for n, (path, name) in enumerate(_data_files(data_dir, {db_file, queue_file}, with_secrets)):
            if _is_sqlite(path):  # another live SQLite file (an operator's, say): copied consistently too
                progress.step(f"copying {name} (SQLite online backup)")
                sqlite_copy(path, stage / f"extra-{n}.sqlite", progress, path.name)
                path = stage / f"extra-{n}.sqlite"
            members.append((path, name))
        manifest = _manifest(cfg, engine, queue, with_secrets, members)
        progress.step(f"writing {target} ({len(members)} files)")
        _write_archive(target, manifest, members, progress)
    progress.step(f"backup complete: {target}")
    return manifest


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\0"
    except OSError:
        return False


def _schema_version(cfg: Any) -> int:
    """The schema version of the database being backed up (the newest this appliance knows when it cannot be read)."""
    from appliance import db

    handle = db.open_database(cfg)
    try:
        with db.translated():
            return int(db.current_version(handle))
    except Exception:
        return _latest_schema()
    finally:
        with contextlib.suppress(Exception):
            handle.close()


def _archive_name(data_dir: Path, path: Path) -> str:
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:  # a database file configured outside the data dir goes in under its name
        return path.name


def _manifest(cfg: Any, engine: str, queue: str, with_secrets: bool, members: list[tuple[Path, str]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "appliance_version": __version__,
        "schema_version": _schema_version(cfg),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "engine": engine,
        "queue": queue,
        "database_file": next((n for p, n in members if p.name == "db.sqlite"), None),
        "with_secrets": with_secrets,
        "files": {name: {"size": path.stat().st_size, "sha256": sha256_file(path)} for path, name in members},
    }


def _latest_schema() -> int:
    from appliance.db import migrations

    return max((number for number, _name, _func in migrations.MIGRATIONS), default=0)


class _HashingReader:
    """A file object that hashes what tarfile reads from it (the bytes that go into the archive)."""

    def __init__(self, fh: Any):
        self._fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self.digest.update(chunk)
        return chunk


def _write_archive(target: Path, manifest: dict[str, Any], members: list[tuple[Path, str]], progress: Progress) -> None:
    partial = target.with_name(f".{target.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    total = sum(p.stat().st_size for p, _ in members) or 1
    done = 0
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(body), 0o600, int(dt.datetime.now().timestamp())
            tar.addfile(info, io.BytesIO(body))
            for path, name in members:
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o600
                expected = manifest["files"].get(name, {}).get("sha256")
                with open(path, "rb") as fh:
                    hashing = _HashingReader(fh)
                    tar.addfile(info, hashing)
                if expected is not None and hashing.digest.hexdigest() != expected:
                    # A file that changed between the manifest and the archive would make a backup that
                    # restore refuses: say so now, while the operator can run it again.
                    raise BackupError(f"{path} changed while it was being backed up; run the backup again")
                done += info.size
                progress.fraction("archive", done / total)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --- restore ----------------------------------------------------------------------------


def read_archive(archive: Path, stage: Path) -> dict[str, Any]:
    """Unpack `archive` into `stage` and check it whole; returns the manifest or raises BackupError naming the problem."""
    if not archive.is_file():
        raise BackupError(f"{archive} does not exist or is not a file")
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            manifest = _check_manifest(archive, tar)
            names = set(manifest["files"])
            for member in tar.getmembers():
                if member.name == MANIFEST:
                    continue
                if member.name not in names:
                    raise BackupError(f"{archive} holds {member.name!r}, which its manifest does not list; the archive was altered")
                if not member.isfile():
                    raise BackupError(f"{archive}: {member.name!r} is not a plain file; refused")
                tar.extract(member, stage, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise BackupError(f"{archive} is damaged or not a tar.gz backup: {exc}") from None
    for name, meta in manifest["files"].items():
        path = stage / name
        if not path.is_file():
            raise BackupError(f"{archive} is incomplete: {name!r} is listed in the manifest but missing")
        if path.stat().st_size != meta.get("size") or sha256_file(path) != meta.get("sha256"):
            raise BackupError(f"{archive} is damaged: the checksum of {name!r} does not match its manifest")
    return manifest


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _check_manifest(archive: Path, tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        fh = tar.extractfile(MANIFEST)
    except KeyError:
        fh = None
    if fh is None:
        raise BackupError(f"{archive} is not an appliance backup: it has no {MANIFEST}")
    try:
        manifest = json.loads(fh.read())
    except ValueError:
        raise BackupError(f"{archive}: {MANIFEST} is not valid JSON; the archive is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise BackupError(f"{archive} is not an appliance backup (its {MANIFEST} is of another format)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BackupError(
            f"{archive} is backup format {version!r}, made by appliance {manifest.get('appliance_version')}; "
            f"this appliance {__version__} reads format {FORMAT_VERSION} and older: restore it with a newer appliance"
        )
    latest = _latest_schema()
    if isinstance(manifest.get("schema_version"), int) and manifest["schema_version"] > latest:
        raise BackupError(
            f"{archive} holds schema version {manifest['schema_version']} but this appliance knows up to {latest}; "
            "restore it with the appliance version that made it or a newer one"
        )
    for name in manifest["files"]:
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts or name == MANIFEST:
            raise BackupError(f"{archive} lists an unsafe path {name!r}; refused")
    return manifest


def restore(archive: Path, data_dir: Path, *, progress: Progress | None = None, now: dt.datetime | None = None) -> Path | None:
    """Restore `archive` into `data_dir`; returns where the previous data was kept (None when there was none)."""
    from appliance.supervisor.lock import AlreadyRunning, DataDirLock

    progress = progress or Progress()
    data_dir = data_dir.resolve()
    archive = archive.resolve()
    if archive.is_relative_to(data_dir):
        raise BackupError(f"{archive} is inside the data dir it would replace; copy it elsewhere first")
    lock = DataDirLock(data_dir / "run" / "appliance.lock")
    had_data = data_dir.exists() and any(data_dir.iterdir())
    if had_data:
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            raise BackupError(f"cannot restore while the appliance runs: {exc}") from None
    try:
        return _restore_locked(archive, data_dir, had_data, progress, now or dt.datetime.now(dt.UTC))
    finally:
        lock.release()


def _restore_locked(archive: Path, data_dir: Path, had_data: bool, progress: Progress, now: dt.datetime) -> Path | None:
    from appliance import secretfile
    from appliance.supervisor.lock import DataDirLock

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restoring-", dir=data_dir.parent))
    # Locked before it becomes the data dir: no `appliance run` starts on it until the migrations are done.
    stage_lock = DataDirLock(stage / "run" / "appliance.lock")
    stage_lock.acquire()
    current_dump = stage.parent / f".{data_dir.name}.current-{os.getpid()}.pgdump"
    try:
        try:
            progress.step(f"checking {archive}")
            manifest = read_archive(archive, stage)
            created, by = manifest.get("created_at"), manifest.get("appliance_version")
            progress.step(f"archive of {created} by appliance {by}: {len(manifest['files'])} files, checksums match")
            if not (stage / "appliance.toml").is_file():
                raise BackupError(f"{archive} has no appliance.toml; refused")
            _carry_secrets(manifest, data_dir, stage, secretfile)
            cfg = _staged_config(stage, data_dir)
            _check_engine(manifest, cfg, archive)
            os.chmod(stage, 0o700)
            if manifest["engine"] == "postgresql":
                if had_data:
                    progress.step("dumping the current PostgreSQL database first (kept with the previous data)")
                    pg_dump(cfg.database.url, current_dump)
                progress.step("loading the PostgreSQL dump into [database] url (pg_restore, one transaction)")
                pg_restore(cfg.database.url, stage / PG_DUMP_FILE)
                (stage / PG_DUMP_FILE).unlink()
            kept = _swap(data_dir, stage, had_data, manifest, cfg, now, current_dump)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            current_dump.unlink(missing_ok=True)
            raise
        _migrate(data_dir, progress)
        _own_like(data_dir, kept)
    finally:
        stage_lock.release()
    progress.step(f"restore complete into {data_dir}" + (f"; the previous data is kept in {kept}" if kept else ""))
    return kept


def _own_like(tree: Path, previous: Path | None) -> None:
    """Run as root on a service's data dir, the restored files get the previous data dir's owner (the service user)."""
    if previous is None or os.geteuid() != 0:
        return
    st = previous.stat()
    if (st.st_uid, st.st_gid) == (0, 0):
        return
    os.chown(tree, st.st_uid, st.st_gid)
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            os.chown(Path(root) / name, st.st_uid, st.st_gid, follow_symlinks=False)


def _carry_secrets(manifest: dict[str, Any], data_dir: Path, stage: Path, secretfile: Any) -> None:
    """An archive made without secrets keeps the data dir's secrets.toml, or gets fresh ones (every token then ends)."""
    if (stage / "secrets.toml").exists():
        return
    current = data_dir / "secrets.toml"
    if current.is_file():
        shutil.copy2(current, stage / "secrets.toml")
        os.chmod(stage / "secrets.toml", 0o600)
    else:
        secretfile.write_secrets(stage / "secrets.toml", secretfile.generate_secrets())


def _staged_config(stage: Path, data_dir: Path) -> Any:
    from appliance.config import ConfigError, load_config

    try:
        cfg = load_config(stage / "appliance.toml")
    except ConfigError as exc:
        raise BackupError(f"the archive's appliance.toml is not valid: {exc}") from None
    cfg.server.data_dir = str(data_dir)  # where it will live, not the staging dir
    return cfg


def _check_engine(manifest: dict[str, Any], cfg: Any, archive: Path) -> None:
    from appliance import db

    engine = db.engine_name(cfg)
    if manifest.get("engine") != engine:
        raise BackupError(
            f"{archive} holds a {manifest.get('engine')} database but its config (now restored) uses {engine}; "
            "refused: set [database] url like the backed-up appliance had it"
        )
    if engine == "postgresql":
        pg_tool("pg_restore", pg_server_major(cfg.database.url))  # before anything moves: name what to install


def _swap(
    data_dir: Path, stage: Path, had_data: bool, manifest: dict[str, Any], cfg: Any, now: dt.datetime, current_dump: Path
) -> Path | None:
    """The staged dir becomes the data dir; the previous one (with a dump of the replaced database) is kept beside it."""
    kept = None
    if had_data:
        kept = data_dir.with_name(f"{data_dir.name}.before-restore-{now.strftime('%Y%m%dT%H%M%SZ')}")
        data_dir.rename(kept)
        if current_dump.exists():
            current_dump.rename(kept / PG_DUMP_FILE)
    elif data_dir.exists():
        data_dir.rmdir()  # empty
    db_name = manifest.get("database_file")
    if db_name and manifest["engine"] == "sqlite":
        wanted = cfg.path(cfg.database.sqlite_file)
        if wanted.is_relative_to(data_dir) and wanted != data_dir / db_name:
            (stage / db_name).rename(stage / wanted.relative_to(data_dir))
    stage.rename(data_dir)
    return kept


def _migrate(data_dir: Path, progress: Progress) -> None:
    from appliance import db
    from appliance.config import load_config

    cfg = load_config(data_dir / "appliance.toml")
    handle = db.open_database(cfg)
    try:
        with db.translated():
            handle.connect(reuse_if_open=True)
            applied = db.migrate(handle)
    except db.DatabaseError as exc:
        raise BackupError(f"the restored database cannot be migrated: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            handle.close()
    progress.step(f"migrations: {len(applied)} applied" if applied else "migrations: schema up to date")
