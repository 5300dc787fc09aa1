"""Helpers shared by the labeling app's tests and its load benchmark (benchmarks/label_load.py):
a throwaway PostgreSQL database, the real server on a free loopback port, a logged-in HTTP client."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextlib.contextmanager
def postgres_database(server_url: str):
    """A fresh database on the server of `server_url` (its user needs CREATEDB), dropped afterwards;
    yields its URL. Tests running at the same time never see each other's rows."""
    import psycopg
    from sqlalchemy.engine import make_url
    base = make_url(server_url.replace("postgresql+psycopg://", "postgresql://"))
    name = f"alignloop_label_{uuid.uuid4().hex[:12]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(run_dir, db_url: str | None = None, timeout: float = 90.0, extra: tuple = ()):
    """`alignloop label RUN_DIR` in a subprocess on 127.0.0.1 and a free port; yields its base URL."""
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "alignloop", "label", str(run_dir), "--port", str(port), *extra]
    if db_url:
        cmd += ["--db", db_url]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(run_dir) / f"label-server-{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "ALIGNLOOP_QUIET": "1", "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the label server exited ({proc.returncode}):\n"
                                   + Path(log.name).read_text(errors="replace")[-3000:])
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the label server did not start in time")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    if not m:
        raise AssertionError("no CSRF token on the page")
    return m.group(1)


def login(client, username: str, password: str):
    """Log an httpx client (or Starlette TestClient) in; returns the login response (303 on success)."""
    page = client.get("/login")
    return client.post("/login", data={"username": username, "password": password, "csrf": csrf_of(page.text),
                                       "next": "/"}, follow_redirects=False)


def add_account(engine_or_sessionmaker, username: str, password: str, role: str = "labeler") -> None:
    """Create an account in a run's database (the one account system of both web apps)."""
    from sqlalchemy.orm import sessionmaker

    from alignloop.accounts.users import create_user
    Sess = engine_or_sessionmaker if isinstance(engine_or_sessionmaker, sessionmaker) else sessionmaker(
        bind=engine_or_sessionmaker)
    with Sess.begin() as db:
        create_user(db, username, password, role)


def chat_client(base_url: str, username: str, password: str, local_address: str | None = None):
    """An httpx client logged in to `alignloop serve`'s pages, sending the session's CSRF token."""
    import httpx
    transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
    c = httpx.Client(base_url=base_url, timeout=60, transport=transport)
    r = login(c, username, password)
    if r.status_code != 303:
        raise AssertionError(f"login of {username} failed: {r.status_code}")
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', c.get("/").text)
    c.headers["X-CSRF-Token"] = m.group(1)
    return c
