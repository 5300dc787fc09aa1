"""`alignloop label`: the labeling web app, where people give the feedback (the "human" in RLHF).

    alignloop label RUN_DIR [--db URL] [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype auto]
    alignloop label create-admin RUN_DIR --username U [--password-file F]   (else asks twice)
    alignloop label export RUN_DIR [--round N] [--pseudonymize] [--project NAME]   (new versioned files)

Data lives in `RUN_DIR/alignloop.db` (SQLite) unless `--db postgresql://…` names a server. The app is
one server process (login rate limits and the sampling job live in it); many labelers at once are
fine on either database.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from alignloop.config import add_device_arguments
from alignloop.errors import InputError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (database, models, round folders)")
    p.add_argument("--db", metavar="URL", help="database URL (default: sqlite in RUN_DIR/alignloop.db), "
                   "e.g. postgresql://user:password@host/dbname")
    return p


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments, with a `--db` that is no database URL refused before anything else happens."""
    args = p.parse_args(argv)
    if args.db is not None:
        from alignloop.db import check_url
        check_url(args.db)
    return args


def _password(args) -> str:
    if args.password_file:
        path = Path(args.password_file)
        if not path.is_file():
            raise InputError("password file not found", file=path)
        lines = path.read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else ""
    if not sys.stdin.isatty():
        raise InputError("no terminal to ask for the password: give --password-file", field="password")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise InputError("the passwords differ", field="password")
    return first


def _create_admin(argv: list[str]) -> None:
    p = _parser("alignloop label create-admin", "create an admin account (the first one, or another)")
    p.add_argument("--username", required=True)
    p.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")
    args = _parse(p, argv)
    from alignloop.accounts.users import check_account, create_user
    from alignloop.feedback import store
    password = _password(args)
    check_account(args.username, password, "admin")  # bad input stops here, before a database exists
    db_file = Path(args.run_dir) / "alignloop.db"
    new_db = args.db is None and not db_file.exists()
    try:
        Sess = store.open_db(args.run_dir, args.db)
        with Sess.begin() as db:
            create_user(db, args.username, password, "admin")
        Sess.kw["bind"].dispose()
    except BaseException:
        if new_db:  # a failed first account leaves no database behind
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_file}{suffix}").unlink(missing_ok=True)
        raise
    print(f"created admin account {args.username!r}")


def _export(argv: list[str]) -> None:
    p = _parser("alignloop label export", "write new files human-rankings-<time>.jsonl, "
                "human-demonstrations-<time>.jsonl and human-pairs-<time>.jsonl into RUN_DIR/round-N/ "
                "(existing files are never replaced)")
    p.add_argument("--round", type=int, help="round number (default: the newest round folder, or 1)")
    p.add_argument("--pseudonymize", action="store_true", help="replace labeler names by stable pseudonyms")
    p.add_argument("--project", metavar="NAME", help="only this project (default: all)")
    args = _parse(p, argv)
    if args.round is not None and args.round < 1:
        raise InputError("must be 1 or more", field="--round")
    run_dir = Path(args.run_dir)
    if args.db is None and not (run_dir / "alignloop.db").exists():
        raise InputError("no labeling database in this run directory (give --db URL?)", file=run_dir / "alignloop.db")
    from alignloop.feedback import store
    from alignloop.feedback.export import export as run_export
    out = run_export(store.open_db(run_dir, args.db), run_dir, args.round, args.pseudonymize, args.project)
    print(f"label export: round {out['round']}, new files (earlier ones unchanged):")
    for name, n in out["counts"].items():
        print(f"{n:6d} records → {out['dir'] / name}")


def _serve(argv: list[str]) -> None:
    p = _parser("alignloop label", "serve the labeling web app (subcommands: create-admin, export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest prompt file accepted (default 20)")
    add_device_arguments(p)  # where the sampler generates answers to rank
    args = _parse(p, argv)
    from alignloop.config import check_number
    check_number(args.port, "--port", min=1, max=65535)
    check_number(args.max_upload_mb, "--max-upload-mb", min=0.001)  # > 0: a kilobyte at least
    if not Path(args.run_dir).is_dir():
        raise InputError("run directory not found (make it, or start with `alignloop label create-admin`)",
                         file=args.run_dir)
    if args.device != "auto":  # a bad one is exit 2 now, not an error at the first sampling job; only then
        from alignloop.model import pick_device  # is torch imported (seconds) before the app starts
        pick_device(args.device)
    import uvicorn
    from sqlalchemy import func, select

    from alignloop.feedback.app import create_app
    from alignloop.accounts.models import User
    app = create_app(args.run_dir, args.db, max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                     device=args.device, dtype=args.dtype)
    with app.state.Sess() as db:
        if not db.scalar(select(func.count()).select_from(User).where(User.role == "admin")):
            print(f"no admin account yet: run `alignloop label create-admin {args.run_dir} --username NAME`",
                  file=sys.stderr)
    quiet = os.environ.get("ALIGNLOOP_QUIET") == "1"
    print(f"alignloop label: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if quiet else "info",
                access_log=not quiet)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "create-admin":
        return _create_admin(argv[1:])
    if argv and argv[0] == "export":
        return _export(argv[1:])
    return _serve(argv)
