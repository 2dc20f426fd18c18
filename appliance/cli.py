"""The `appliance` command line: one parser, one function per command.

Every command takes --config FILE (default ./appliance-data/appliance.toml or
$APPLIANCE_CONFIG). Problems are printed as one sentence naming what is wrong
and what to do, with exit status 2 for bad input or config and 1 for failures.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem to print as `appliance: <message>` with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAIL):
        self.status = status
        super().__init__(message)


def _load(args: argparse.Namespace) -> Any:
    from appliance.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _open_db(cfg: Any, migrate: bool = False) -> Any:
    from appliance import db

    handle = db.open_database(cfg)
    try:
        with db.translated():
            handle.connect(reuse_if_open=True)
            if migrate:
                db.migrate(handle)
            elif db.pending(handle):
                raise CliError("the database schema is not up to date; run `appliance migrate` first")
    except db.DatabaseError as exc:
        raise CliError(f"database {db.describe(cfg)} cannot be used: {exc}; check [database] url and that the server runs") from None
    return handle


def _read_password_stdin() -> str:
    data = sys.stdin.readline()
    password = data.rstrip("\r\n")
    if not password:
        raise CliError("no password on standard input", EXIT_USAGE)
    return password


# --- commands -----------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    import json

    from appliance import buildinfo

    doc = buildinfo.info()
    print(json.dumps(doc, indent=2) if args.json else buildinfo.render(doc))
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from appliance import backup

    cfg = _load(args)
    try:
        backup.create(cfg, Path(args.file), with_secrets=args.with_secrets, progress=backup.Progress(quiet=args.quiet))
    except backup.BackupError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from appliance import backup, config

    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        cfg_path = Path(args.config) if args.config else config.default_config_path()
        data_dir = _load(args).data_dir if cfg_path.exists() else cfg_path.parent
    try:
        backup.restore(Path(args.file), data_dir, progress=backup.Progress(quiet=args.quiet))
    except backup.BackupError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from appliance import accounts, config, secretfile

    if args.data_dir:
        data_dir = Path(args.data_dir)
        cfg_path = data_dir / "appliance.toml"
    else:
        cfg_path = Path(args.config) if args.config else config.default_config_path()
        data_dir = cfg_path.parent
    secrets_path = data_dir / "secrets.toml"
    if cfg_path.exists() and not args.force:
        raise CliError(f"{cfg_path} already exists; pass --force to overwrite it (fresh secrets log every user out)", EXIT_USAGE)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    secretfile.write_private(cfg_path, config.render_sample().encode())
    secretfile.write_secrets(secrets_path, secretfile.generate_secrets())
    extra_init(args, data_dir)
    args.config = str(cfg_path)
    cfg = _load(args)
    _open_db(cfg, migrate=True)
    from appliance.db.models import User

    print(f"wrote {cfg_path} and {secrets_path} (mode 0600)")
    if User.select().where(User.username == args.admin).exists():
        print(f"user {args.admin!r} exists already; kept (change its password with `appliance user set-password`)")
        return EXIT_OK
    password = secretfile.generate_password()
    accounts.create_user(args.admin, None, password, role="admin", rounds=cfg.auth.bcrypt_rounds, min_length=cfg.auth.min_password_length)
    print(f"created admin user {args.admin!r} with password: {password}")
    print("this password is shown once; store it now")
    return EXIT_OK


def extra_init(args: argparse.Namespace, data_dir: Path) -> None:
    """Hook for init options of other subsystems (e.g. --tls self-signed)."""
    if getattr(args, "tls", None) == "self-signed":
        from appliance.balancer import certs  # written by the balancer

        certs.init_self_signed(data_dir)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from appliance import db

    print(f"{cfg.source}: configuration is valid")
    print(
        f"database: {db.describe(cfg)}; queue: {'redis' if cfg.redis.url else 'sqlite'}; "
        f"api workers: {cfg.api_workers}; task workers: {cfg.queue.workers}; listen: {cfg.balancer.listen}"
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from appliance import db

    handle = db.open_database(cfg)
    try:
        with db.translated():
            applied = db.migrate(handle)
            version = db.current_version(handle)
    except db.DatabaseError as exc:
        raise CliError(f"migration of {db.describe(cfg)} failed: {exc}") from None
    if not applied:
        print(f"database is up to date (schema version {version}); nothing to do")
    for number, name in applied:
        print(f"applied migration {number}: {name}")
    return EXIT_OK


def cmd_user(args: argparse.Namespace) -> int:
    from appliance import accounts, secretfile
    from appliance.db.models import User

    cfg = _load(args)
    _open_db(cfg)
    rounds, min_len = cfg.auth.bcrypt_rounds, cfg.auth.min_password_length
    try:
        if args.user_cmd == "create":
            generated = not args.password_stdin
            password = secretfile.generate_password() if generated else _read_password_stdin()
            user = accounts.create_user(
                args.name, args.email, password, role="admin" if args.admin else "user", rounds=rounds, min_length=min_len
            )
            print(f"created user {user.username!r} (id {user.id}, role {user.role})")
            if generated:
                print(f"password: {password}")
                print("this password is shown once; store it now")
        elif args.user_cmd == "list":
            print(f"{'id':>5}  {'username':<24} {'role':<6} {'active':<6} email")
            for u in User.select().order_by(User.id):
                print(f"{u.id:>5}  {u.username:<24} {u.role:<6} {'yes' if u.is_active else 'no':<6} {u.email}")
        elif args.user_cmd == "set-password":
            if not args.password_stdin:
                password = getpass.getpass(f"new password for {args.name}: ")
            else:
                password = _read_password_stdin()
            accounts.set_password(accounts.get_user(args.name), password, rounds=rounds, min_length=min_len)
            print(f"password of {args.name!r} changed; its existing tokens are revoked")
        elif args.user_cmd == "set-role":
            user = accounts.get_user(args.name)
            if accounts.set_role(user, args.role):  # a change revokes the user's tokens (they carry the role)
                print(f"{user.username!r} is now {args.role}; its existing tokens are revoked")
            else:
                print(f"{user.username!r} is already {args.role}; nothing changed")
        elif args.user_cmd in ("disable", "enable"):
            user = accounts.get_user(args.name)
            if accounts.set_active(user, args.user_cmd == "enable"):
                print(f"{user.username!r} is {args.user_cmd}d; its existing tokens are revoked")
            else:
                print(f"{user.username!r} is already {args.user_cmd}d; nothing changed")
    except accounts.AccountError as exc:
        raise CliError(f"{exc.field or 'user'}: {exc.message}", EXIT_USAGE) from None
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    try:
        from appliance.supervisor import main as supervisor_main
    except ImportError:
        raise CliError("the supervisor is not built yet: `appliance run` cannot start the appliance") from None
    return supervisor_main.run(args)


def cmd_child(args: argparse.Namespace) -> int:
    from appliance.supervisor import roles

    return roles.run_child(args)


def _add_config(p: argparse.ArgumentParser, top: bool = False) -> None:
    # Sub-commands use SUPPRESS so a value given before the command is not reset to None.
    default = None if top else argparse.SUPPRESS
    p.add_argument(
        "--config", metavar="FILE", default=default, help="config file (default: $APPLIANCE_CONFIG or ./appliance-data/appliance.toml)"
    )
    p.add_argument("--log-format", choices=("json", "text"), default=default, help="log lines as JSON (default) or text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A complete high-availability API service in one executable.")
    _add_config(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="write a config, fresh secrets, the database and an admin user")
    _add_config(p)
    p.add_argument("--data-dir", metavar="DIR", help="data directory (default: the config file's directory)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config and secrets")
    p.add_argument("--admin", default="admin", metavar="NAME", help="name of the admin user to create (default admin)")
    p.add_argument("--tls", choices=("self-signed",), help="also write a self-signed certificate for this host")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check", help="validate the configuration and say what it sets up")
    _add_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("migrate", help="apply pending database migrations")
    _add_config(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("run", help="run the appliance (supervisor and every process)")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("user", help="manage user accounts")
    _add_config(p)
    us = p.add_subparsers(dest="user_cmd", metavar="ACTION", required=True)
    c = us.add_parser("create", help="create a user (a strong password is generated unless --password-stdin)")
    c.add_argument("name")
    c.add_argument("--admin", action="store_true", help="give the admin role")
    c.add_argument("--email", metavar="E")
    c.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _add_config(c)
    c = us.add_parser("list", help="list users")
    _add_config(c)
    c = us.add_parser("set-password", help="set a user's password (revokes its tokens)")
    c.add_argument("name")
    c.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _add_config(c)
    c = us.add_parser("set-role", help="make a user admin or user (revokes its tokens)")
    c.add_argument("name")
    c.add_argument("role", choices=("admin", "user"))
    _add_config(c)
    for action in ("disable", "enable"):
        c = us.add_parser(action, help=f"{action} a user's account (revokes its tokens)")
        c.add_argument("name")
        _add_config(c)
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("version", help="print the version, commit, build date, Python and bundled dependencies")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("backup", help="write one archive of the database, queue, uploads and config (while running is fine)")
    _add_config(p)
    p.add_argument("file", metavar="FILE", help="the archive to write (tar.gz, mode 0600)")
    p.add_argument("--with-secrets", action="store_true", help="also include secrets.toml and the TLS key")
    p.add_argument("--quiet", action="store_true", help="no progress on standard error")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="replace the data dir with a backup archive (the appliance must be stopped)")
    _add_config(p)
    p.add_argument("file", metavar="FILE", help="the archive written by `appliance backup`")
    p.add_argument("--data-dir", metavar="DIR", help="data directory to restore into (default: the config file's)")
    p.add_argument("--quiet", action="store_true", help="no progress on standard error")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("_child")  # internal: how the supervisor starts a role
    p.add_argument("role")
    p.add_argument("--index", type=int, default=0)
    _add_config(p)
    p.set_defaults(func=cmd_child)

    extend_parser(sub)
    return parser


def extend_parser(sub: Any) -> None:
    """Commands owned by other modules register here (supervisor: status, systemd-unit)."""
    try:
        from appliance.supervisor import commands
    except ImportError:
        return
    commands.register(sub, _add_config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from appliance.logs import setup_logging

    setup_logging("cli", args.log_format or "text", "warning")
    try:
        return args.func(args)
    except CliError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last resort: name the failure, no bare traceback for users
        logging.getLogger("appliance").debug("unexpected error", exc_info=True)
        print(f"appliance: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
