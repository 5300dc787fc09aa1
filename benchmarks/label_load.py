"""Load test of the labeling app: L labelers at once, each answering T ranking tasks, against the real
server (`alignloop label`, one uvicorn process) on loopback, on SQLite and on PostgreSQL.

Every labeler logs in, then loops: ask for the next task, open its page, submit a ranking (with a
critique that names labeler and task), and every fifth time submits the same task again (a double
click) — which must be refused. Afterwards the database must hold every submission exactly once:
none lost, none duplicated, no item over its overlap, the counters equal to the rows.

    python benchmarks/label_load.py                          # 20 × 50 on SQLite and PostgreSQL
    python benchmarks/label_load.py --labelers 8 --tasks 10 --db sqlite
PostgreSQL: --pg URL or $ALIGNLOOP_TEST_PG_URL (a throwaway database is created on that server).
Bounded: every request has a timeout and the whole run a deadline.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from alignloop.accounts.models import User  # noqa: E402
from alignloop.accounts.security import hash_password  # noqa: E402
from alignloop.feedback import store  # noqa: E402
from alignloop.feedback.models import Item, Task  # noqa: E402
from alignloop.feedback.testing import csrf_of, postgres_database, server  # noqa: E402

K = 4
PASSWORD = "load-test-password"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def _stats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": 1000 * _pct(xs, 0.5), "p95_ms": 1000 * _pct(xs, 0.95),
            "max_ms": 1000 * max(xs, default=float("nan")), "mean_ms": 1000 * statistics.fmean(xs) if xs else None}


def _prepare(run_dir: Path, url: str | None, labelers: int) -> None:
    """Accounts straight into the database (argon2 costs ~0.25 s a hash: done in parallel, not timed)."""
    Sess = store.open_db(run_dir, url)
    names = ["admin"] + [f"labeler{i:02d}" for i in range(labelers)]
    hashes = list(ThreadPoolExecutor(4).map(hash_password, [PASSWORD] * len(names)))
    with Sess.begin() as db:
        for name, h in zip(names, hashes):
            db.add(User(username=name, password_hash=h, role="admin" if name == "admin" else "labeler", active=True))
    Sess.kw["bind"].dispose()


async def _login(c: httpx.AsyncClient, name: str) -> None:
    page = await c.get("/login")
    r = await c.post("/login", data={"username": name, "password": PASSWORD, "csrf": csrf_of(page.text), "next": "/"})
    if r.status_code != 303:
        raise RuntimeError(f"{name}: login failed ({r.status_code})")


async def _setup_project(base: str, n_items: int, overlap: int) -> int:
    async with httpx.AsyncClient(base_url=base, timeout=60) as admin:
        await _login(admin, "admin")
        t = csrf_of((await admin.get("/")).text)
        r = await admin.post("/projects", data={"csrf": t, "name": "load", "kind": "ranking", "k": K,
                                                 "overlap": overlap})
        pid = int(re.search(r"/projects/(\d+)", r.headers["location"]).group(1))
        body = "".join(json.dumps({"prompt": f"load prompt {i}",
                                   "completions": [f"answer {j} to {i}" for j in range(K)]}) + "\n"
                       for i in range(n_items))
        r = await admin.post(f"/projects/{pid}/import", data={"csrf": t},
                             files={"file": ("load.jsonl", body.encode())})
        if r.status_code != 303:
            raise RuntimeError(f"import failed ({r.status_code}): {r.text[:500]}")
    return pid


async def _labeler(c: httpx.AsyncClient, pid: int, name: str, tasks: int, lat: dict, record: list,
                   rng: random.Random):
    for j in range(tasks):
        t0 = time.perf_counter()
        r = await c.get(f"/projects/{pid}/next")
        lat["next"].append(time.perf_counter() - t0)
        if r.status_code != 303:
            raise RuntimeError(f"{name}: no task after {j} ({r.status_code})")
        tid = int(r.headers["location"].rsplit("/", 1)[1])
        t0 = time.perf_counter()
        page = await c.get(f"/tasks/{tid}")
        lat["page"].append(time.perf_counter() - t0)
        order = list(range(K))
        rng.shuffle(order)
        data = {"csrf": csrf_of(page.text), "order": ",".join(map(str, order)), "critique": f"{name}:{tid}",
                "flag_harmful_0": "on"}
        t0 = time.perf_counter()
        r = await c.post(f"/tasks/{tid}", data=data)
        lat["submit"].append(time.perf_counter() - t0)
        if r.status_code != 303:
            raise RuntimeError(f"{name}: submit of task {tid} answered {r.status_code}")
        record.append((name, tid))
        if j % 5 == 4:  # a double click: must be refused, storing nothing
            r = await c.post(f"/tasks/{tid}", data=data)
            if r.status_code != 409:
                raise RuntimeError(f"{name}: a second submission of task {tid} answered {r.status_code}")
            lat["dup_refused"].append(0.0)


async def _everyone(base, pid, labelers, tasks, lat, record, seed) -> float:
    """Log everyone in (not timed: argon2 is slow on purpose), then all label at once; returns the wall time."""
    names = [f"labeler{i:02d}" for i in range(labelers)]
    clients = [httpx.AsyncClient(base_url=base, timeout=30) for _ in names]
    try:
        await asyncio.gather(*(_login(c, n) for c, n in zip(clients, names)))
        rng = random.Random(seed)
        t0 = time.perf_counter()
        await asyncio.gather(*(_labeler(c, pid, n, tasks, lat, record, random.Random(rng.random()))
                               for c, n in zip(clients, names)))
        return time.perf_counter() - t0
    finally:
        for c in clients:
            await c.aclose()


def _check(run_dir: Path, url: str | None, pid: int, overlap: int, record: list) -> list[str]:
    """Every acknowledged submission stored exactly once; nothing else stored."""
    problems = []
    Sess = store.open_db(run_dir, url)
    with Sess() as db:
        rows = db.execute(select(Task.id, User.username, Task.answer, Task.item_id).join(User, User.id == Task.user_id)
                          .where(Task.project_id == pid, Task.status == "submitted")).all()
        items = db.execute(select(Item.id, Item.n_assigned, Item.n_done).where(Item.project_id == pid)).all()
        open_tasks = db.scalar(select(func.count()).select_from(Task).where(Task.project_id == pid,
                                                                             Task.status != "submitted"))
    Sess.kw["bind"].dispose()
    stored = {(name, tid) for tid, name, _, _ in rows}
    if len(rows) != len(record):
        problems.append(f"{len(rows)} submissions stored for {len(record)} acknowledged")
    if stored != set(record):
        problems.append(f"lost: {sorted(set(record) - stored)[:5]}, unexpected: {sorted(stored - set(record))[:5]}")
    critiques = [a.get("critique") for _, _, a, _ in rows]
    if sorted(critiques) != sorted(f"{n}:{t}" for n, t in record):
        problems.append("stored answers do not match what was sent")
    per_item: dict[int, int] = {}
    for _, _, _, item_id in rows:
        per_item[item_id] = per_item.get(item_id, 0) + 1
    for item_id, n_assigned, n_done in items:
        if per_item.get(item_id, 0) != n_done or n_done > overlap or n_assigned > overlap:
            problems.append(f"item {item_id}: {per_item.get(item_id, 0)} answers, n_done {n_done}, "
                            f"n_assigned {n_assigned}, overlap {overlap}")
    pairs = [(n, i) for _, n, _, i in rows]
    if len(pairs) != len(set(pairs)):
        problems.append("an item was answered twice by the same labeler")
    if open_tasks:
        problems.append(f"{open_tasks} tasks left open")
    return problems


def run(db: str = "sqlite", labelers: int = 20, tasks: int = 50, overlap: int = 2, pg_url: str | None = None,
        deadline_s: float = 900.0, seed: int = 0) -> dict:
    """One load run against `db` ("sqlite" or "postgresql"); returns latencies and the problems found."""
    n_items = labelers * tasks // overlap + labelers
    with tempfile.TemporaryDirectory(prefix="label-load-") as tmp, \
            (postgres_database(pg_url) if db == "postgresql" else nullcontext(None)) as url:
        run_dir = Path(tmp) / "run"
        _prepare(run_dir, url, labelers)
        with server(run_dir, url) as base:
            pid = asyncio.run(_setup_project(base, n_items, overlap))
            lat: dict[str, list[float]] = {"next": [], "page": [], "submit": [], "dup_refused": []}
            record: list[tuple[str, int]] = []

            wall = asyncio.run(asyncio.wait_for(_everyone(base, pid, labelers, tasks, lat, record, seed), deadline_s))
        problems = _check(run_dir, url, pid, overlap, record)
    return {"db": db, "labelers": labelers, "tasks": tasks, "overlap": overlap, "items": n_items,
            "submissions": len(record), "duplicates_refused": len(lat["dup_refused"]), "wall_s": wall,
            "submissions_per_s": len(record) / wall, "submit": _stats(lat["submit"]), "next": _stats(lat["next"]),
            "page": _stats(lat["page"]), "problems": problems}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelers", type=int, default=20)
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--overlap", type=int, default=2)
    p.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--pg", default=os.environ.get("ALIGNLOOP_TEST_PG_URL"), help="PostgreSQL server URL")
    args = p.parse_args()
    failed = False
    for db in args.db.split(","):
        if db == "postgresql" and not args.pg:
            print("postgresql: skipped (give --pg URL or set ALIGNLOOP_TEST_PG_URL)")
            continue
        r = run(db, args.labelers, args.tasks, args.overlap, args.pg)
        print(f"{db}: {r['labelers']} labelers × {r['tasks']} tasks = {r['submissions']} submissions in "
              f"{r['wall_s']:.1f} s ({r['submissions_per_s']:.1f}/s); "
              f"{r['duplicates_refused']} double submissions refused")
        for kind in ("submit", "next", "page"):
            s = r[kind]
            print(f"  {kind:<6} p50 {s['p50_ms']:7.1f} ms   p95 {s['p95_ms']:7.1f} ms   max {s['max_ms']:7.1f} ms")
        print("  stored exactly once: " + ("yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])))
        failed |= bool(r["problems"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
