"""The database layer shared by the labeling app and the chat server.

SQLite in the run directory by default (`RUN/alignloop.db`), PostgreSQL by URL. Schema changes are
Alembic migrations in `alignloop/db/migrations/versions/`; each app keeps its own migration branch
(branch label `labeling` or `chat`) so that the two grow independently, and `migrate()` applies
every head.
"""
from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, sessionmaker

from alignloop.errors import InputError

MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base of every alignloop table."""


def database_url(run_dir: str | Path | None, url: str | None = None) -> str:
    if url:
        return url
    if run_dir is None:
        raise ValueError("a run directory or a database URL is needed")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(run_dir).resolve() / 'alignloop.db'}"


EXPECTED_URL = "expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST[:PORT]/DBNAME"


def masked(url: str) -> str:
    """`url` with its password, if any, replaced by *** (for messages)."""
    url = re.sub(r"^([A-Za-z0-9+.-]+://[^/@:]*:).*@", r"\1***@", url)  # up to the last @: a raw @ in it too
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


def check_url(url: str) -> None:
    """Refuse (InputError, field --db) what is not an SQLite or a PostgreSQL (psycopg) URL, before any work:
    the one check of `--db` for `alignloop label`, `label create-admin`, `label export`, `serve` and
    `serve export` (`connect` makes it too)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        driver = make_url(url).drivername
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        driver = None
    if driver not in ("sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg"):
        raise InputError(f"{masked(url)!r} is not a database URL this app opens; {EXPECTED_URL}", field="--db")


def connect(url: str) -> Engine:
    """An engine; SQLite gets WAL (readers do not block the writer), a busy timeout and foreign keys.
    On both, text is stored without NUL characters (see `_without_nul`). A URL that is not one of those,
    or a database that cannot be reached, is an InputError naming the URL (its password masked)."""
    check_url(url)
    engine = _engine(url)
    try:  # every caller connects at once (migrate): fail here with one line, not a driver's traceback
        engine.connect().close()
    except DBAPIError as e:
        engine.dispose()
        reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
        raise InputError(f"cannot open the database {masked(url)!r}: {reason}", field="--db") from None
    return engine


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        # a server that does not answer is said within seconds, not after the OS's TCP timeout (minutes)
        connect_args = {} if "connect_timeout" in url else {"connect_timeout": 10}
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True, connect_args=connect_args)
    event.listen(engine, "before_cursor_execute", _without_nul, retval=True)
    return engine


def _without_nul(conn, cursor, statement, parameters, context, executemany):
    """PostgreSQL text cannot hold NUL (U+0000) and refuses the whole statement; a byte-level model can
    sample that byte and a user can type it. Every text parameter, of every table, has it replaced by
    U+FFFD (visible as "something unprintable was here") — on SQLite too, so both store the same."""
    def clean(v):
        if isinstance(v, str):
            return v.replace("\x00", "\ufffd") if "\x00" in v else v
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(clean(x) for x in v)
        return v
    return statement, clean(parameters)


def migrate(engine: Engine) -> None:
    """Bring the schema up to date (every branch head)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")


def sessions(engine: Engine) -> sessionmaker:
    return sessionmaker(bind=engine, expire_on_commit=False)
