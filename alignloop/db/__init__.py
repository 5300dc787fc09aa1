"""The database layer shared by the labeling app and the chat server.

SQLite in the run directory by default (`RUN/alignloop.db`), PostgreSQL by URL. Schema changes are
Alembic migrations in `alignloop/db/migrations/versions/`; each app keeps its own migration branch
(branch label `labeling` or `chat`) so that the two grow independently, and `migrate()` applies
every head.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, sessionmaker

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


def connect(url: str) -> Engine:
    """An engine; SQLite gets WAL (readers do not block the writer), a busy timeout and foreign keys.
    On both, text is stored without NUL characters (see `_without_nul`)."""
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
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
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
