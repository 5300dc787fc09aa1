"""The labeling app's data operations, independent of the web layer: projects, prompt import, the
task queue, answers, progress and agreement (accounts are `alignloop.accounts.users`). The CLI, the
web app, the tests and the load benchmark all go through these functions.

Every write is one short transaction; the queue's guarantees come from the schema (see models.py),
so they hold on SQLite (WAL, one writer at a time) and on PostgreSQL (row locks) alike.
"""
from __future__ import annotations

import contextlib
import random
import re
import secrets
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased, sessionmaker

from alignloop.db import connect, database_url, migrate, sessions
from alignloop.accounts.models import User
from alignloop.errors import InputError
from alignloop.feedback.agreement import ranks, summarize
from alignloop.feedback.models import KINDS, Item, Project, Setting, Task, now
from alignloop.io import read_records
from alignloop.tokenizer import validate_messages

K_MIN, K_MAX = 2, 9
CRITERIA = ("helpful", "truthful", "harmless")
FLAGS = ("hallucination", "fails_instruction", "harmful", "other")
MAX_TEXT = 20_000  # characters of one written answer, critique or correction


def open_db(run_dir, url: str | None = None) -> sessionmaker:
    """Connect to the run's database (or `url`), bring the schema up to date, return a session factory."""
    engine = connect(database_url(run_dir, url))
    migrate(engine)
    return sessions(engine)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def writing(Sess: sessionmaker):
    """SQLite has one writer at a time; its busy handler waits by sleeping and retrying, which under
    load gives multi-second tails. In this process writers queue on a lock instead (other processes
    still meet SQLite's own locking). PostgreSQL locks rows: nothing to do."""
    engine = Sess.kw["bind"]
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(engine, threading.Lock())


# ---------------------------------------------------------------- projects


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise InputError(f"expected a whole number from {lo} to {hi}", field=name) from None
    if not lo <= v <= hi:
        raise InputError(f"expected a whole number from {lo} to {hi}", field=name)
    return v


def create_project(db, name: str, kind: str = "ranking", k=4, overlap=1, instructions: str = "") -> Project:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InputError("a project needs a name (at most 200 characters)", field="name")
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r} (expected ranking or demonstration)", field="kind")
    k, overlap = _int(k, "k", K_MIN, K_MAX), _int(overlap, "overlap", 1, 50)
    if db.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise InputError(f"a project named {name!r} exists", field="name")
    project = Project(name=name, kind=kind, k=k, overlap=overlap, instructions=(instructions or "").strip())
    db.add(project)
    db.flush()
    return project


def setting(Sess: sessionmaker, key: str, make) -> str:
    """An install-wide value, created once (the first writer wins under concurrency)."""
    with Sess() as db:
        row = db.get(Setting, key)
        if row is not None:
            return row.value
        try:
            db.add(Setting(key=key, value=make()))
            db.commit()
        except IntegrityError:
            db.rollback()
    with Sess() as db:
        return db.get(Setting, key).value


# ---------------------------------------------------------------- importing prompts


def _prompt_of(rec: dict, file, line: int) -> list[dict]:
    if "prompt" in rec and rec["prompt"] is not None:
        p = rec["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise InputError("is empty", file=file, line=line, field="prompt")
            return [{"role": "user", "content": p}]
        if not isinstance(p, list):
            raise InputError(f"expected a string or a list of messages, got {type(p).__name__}",
                             file=file, line=line, field="prompt")
        msgs = validate_messages(p, file, line)
    elif "messages" in rec:
        msgs = validate_messages(rec["messages"], file, line)
    else:
        raise InputError("expected 'prompt' (text or messages) or 'messages'", file=file, line=line, field="prompt")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    while msgs and msgs[-1]["role"] == "assistant":  # a demonstration's answer is not part of the prompt
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise InputError("the conversation must end with a user turn", file=file, line=line, field="messages")
    return msgs


def parse_import(path: Path, name: str, kind: str) -> list[tuple[list[dict], list[str] | None]]:
    """Read and check a whole prompts file before anything is stored (nothing is imported half-way).

    Records: {"prompt": text | messages} or {"messages": [...]} (a trailing assistant turn is
    dropped), optionally with "completions": [2…9 answers] (imported answers to rank).
    Errors name `name` (the uploaded file's name), the line and the field."""
    low = name.lower()
    if not low.endswith((".jsonl", ".json", ".parquet", ".jsonl.gz")):
        raise InputError("unsupported file type (expected .jsonl, .json or .parquet)", file=name)
    suffix = ".jsonl.gz" if low.endswith(".jsonl.gz") else Path(low).suffix
    tmp = path if path.name.lower().endswith(suffix) else path.rename(path.with_name(path.name + suffix))
    try:
        records = read_records(tmp)
    except InputError as e:
        raise InputError(e.message, file=name, line=e.line, field=e.field) from None
    out = []
    for line, rec in records:
        try:
            prompt = _prompt_of(rec, name, line)
        except InputError as e:
            raise InputError(e.message, file=name, line=line, field=e.field) from None
        completions = rec.get("completions")
        if completions is not None and kind == "ranking":
            if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
                raise InputError("expected a list of strings", file=name, line=line, field="completions")
            if not K_MIN <= len(completions) <= K_MAX:
                raise InputError(f"expected {K_MIN} to {K_MAX} answers, got {len(completions)}",
                                 file=name, line=line, field="completions")
            for i, c in enumerate(completions):
                if not c.strip():
                    raise InputError("empty answer", file=name, line=line, field=f"completions[{i}]")
            if len(set(completions)) < len(completions):
                raise InputError("the same answer twice (a ranking needs distinct answers)", file=name,
                                 line=line, field="completions")
            if any(len(c) > MAX_TEXT for c in completions):
                raise InputError(f"an answer is longer than {MAX_TEXT} characters", file=name, line=line,
                                 field="completions")
        else:
            completions = None
        out.append((prompt, completions))
    return out


def import_items(Sess: sessionmaker, project_id: int, parsed, source: str = "import") -> int:
    """Store parsed records as items, all in one transaction."""
    with writing(Sess), Sess.begin() as db:
        project = db.get(Project, project_id)
        for prompt, completions in parsed:
            ready = project.kind == "demonstration" or completions is not None
            db.add(Item(project_id=project_id, prompt=prompt, completions=completions, source=source,
                        ready=ready, n_assigned=0, n_done=0))
    return len(parsed)


# ---------------------------------------------------------------- the queue


def open_task(db, user_id: int, project_id: int) -> Task | None:
    return db.scalar(select(Task).where(Task.user_id == user_id, Task.project_id == project_id,
                                        Task.status == "assigned").order_by(Task.id).limit(1))


def next_task(Sess: sessionmaker, user_id: int, project_id: int, rng=random) -> Task | None:
    """The user's open task in the project, else a new one: a ready item that has fewer than `overlap`
    live tasks and that this user never had (answered, open or skipped). Items with the most live
    tasks come first, so items reach their N labels (and agreement) early."""
    with Sess() as db:
        task = open_task(db, user_id, project_id)
        if task is not None:
            return task
        project = db.get(Project, project_id)
        if project is None:
            return None
        overlap, kind = project.overlap, project.kind
    for _ in range(50):
        with writing(Sess):
            task = _claim(Sess, user_id, project_id, overlap, kind, rng)
        if task is not None:
            return task
        with Sess() as db:  # nothing claimed: none left, or (PostgreSQL) all left are being claimed now
            if db.scalar(_candidates(user_id, project_id, overlap, aliased(Item))) is None:
                return None
        time.sleep(0.005 * rng.random())
    return None


def _candidates(user_id: int, project_id: int, overlap: int, it):
    mine = exists().where(Task.item_id == it.id, Task.user_id == user_id)
    return (select(it.id).where(it.project_id == project_id, it.ready, it.n_assigned < overlap, ~mine)
            .order_by(it.n_assigned.desc(), it.id).limit(1))


def _claim(Sess: sessionmaker, user_id: int, project_id: int, overlap: int, kind: str, rng) -> Task | None:
    """Take a free slot of the first candidate item in one statement. On PostgreSQL, rows that other
    requests are claiming right now are skipped (FOR UPDATE SKIP LOCKED: the classic queue), so
    labelers asking at once do not wait on each other; SQLite writers are serialized anyway."""
    pick = _candidates(user_id, project_id, overlap, aliased(Item)).with_for_update(skip_locked=True)
    db = Sess()
    try:
        row = db.execute(update(Item).where(Item.id == pick.scalar_subquery(), Item.n_assigned < overlap)
                         .values(n_assigned=Item.n_assigned + 1).returning(Item.id, Item.completions)
                         .execution_options(synchronize_session=False)).first()
        if row is None:
            db.rollback()
            return None
        k = len(row.completions) if kind == "ranking" and row.completions else 0
        task = Task(item_id=row.id, user_id=user_id, project_id=project_id, status="assigned",
                    shown=rng.sample(range(k), k) if k else None)
        db.add(task)
        db.commit()
        return task
    except IntegrityError:  # this user took the item in a concurrent request
        db.rollback()
        return None
    finally:
        db.close()


class Conflict(Exception):
    """The task is no longer open (already answered or skipped)."""


def _finish(Sess: sessionmaker, task_id: int, user_id: int, values: dict, skipped: bool) -> None:
    with writing(Sess), Sess.begin() as db:
        item_id = db.scalar(update(Task).where(Task.id == task_id, Task.user_id == user_id, Task.status == "assigned")
                            .values(**values).returning(Task.item_id).execution_options(synchronize_session=False))
        if item_id is None:
            raise Conflict("this task was already answered or skipped")
        change = {"n_assigned": Item.n_assigned - 1} if skipped else {"n_done": Item.n_done + 1}
        db.execute(update(Item).where(Item.id == item_id).values(**change)
                   .execution_options(synchronize_session=False))


def submit(Sess: sessionmaker, task_id: int, user_id: int, answer: dict, elapsed_ms: int | None = None) -> None:
    """Store an answer exactly once: a second submission of the same task raises Conflict."""
    _finish(Sess, task_id, user_id, {"status": "submitted", "answer": answer, "submitted_at": now(),
                                     "elapsed_ms": elapsed_ms}, False)


def elapsed_of(fields: Mapping) -> int | None:
    """The task page's timer (ms from load to submit). A missing or odd value (no script, a tampered
    form) is stored as unknown rather than refusing the answer: the time is a statistic, not the label."""
    v = (fields.get("elapsed_ms") or "").strip()
    return int(v) if v.isdigit() and int(v) < 2**31 else None


def skip(Sess: sessionmaker, task_id: int, user_id: int, reason: str) -> None:
    """Skip with a reason: the slot goes back to the queue, the item never comes back to this user."""
    reason = (reason or "").strip()
    if not reason:
        raise InputError("say why you skip", field="reason")
    _finish(Sess, task_id, user_id, {"status": "skipped", "skip_reason": reason[:2000], "submitted_at": now()}, True)


def release_stale(Sess: sessionmaker, project_id: int, hours: float) -> int:
    """Give back the slots of tasks left open longer than `hours` (a labeler who walked away); they
    count as skipped for that labeler (status "released"). Returns how many were released."""
    from datetime import timedelta
    cutoff = now() - timedelta(hours=hours)
    with writing(Sess), Sess.begin() as db:
        items = db.scalars(update(Task).where(Task.project_id == project_id, Task.status == "assigned",
                                              Task.created_at < cutoff)
                           .values(status="released", skip_reason=f"released after {hours:g} h open",
                                   submitted_at=now())
                           .returning(Task.item_id).execution_options(synchronize_session=False)).all()
        for item_id in items:
            db.execute(update(Item).where(Item.id == item_id).values(n_assigned=Item.n_assigned - 1)
                       .execution_options(synchronize_session=False))
    return len(items)


# ---------------------------------------------------------------- answers from the task page


def _text(fields: Mapping, name: str) -> str:
    value = (fields.get(name) or "").replace("\r\n", "\n").strip()
    if len(value) > MAX_TEXT:
        raise InputError(f"longer than {MAX_TEXT} characters", field=name)
    return value


def _positions(text: str, k: int, field: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError("expected answer positions separated by commas", field=field) from None


def ranking_answer(shown: list[int], fields: Mapping, completions: list[str] | None = None) -> dict:
    """The ranking form → an answer in the items' own answer indices.

    Form fields use display positions p (the page shows answer `shown[p]` at position p):
    `order` "p,p,…" best → worst; `ties` "p,p;p,p" groups of positions judged equal (each a run of
    neighbours in the order); `all_bad`; `helpful_p`/`truthful_p`/`harmless_p` 1–7 (any of them: an
    answer left unrated is {} in `ratings`, and no rating at all is `ratings` None);
    `flag_<name>_p`; `critique`; `correct_p` + `correction`."""
    k = len(shown)
    order = _positions(fields.get("order") or "", k, "order")
    if sorted(order) != list(range(k)):
        raise InputError(f"the order must list each of the {k} answers once", field="order")
    place = {p: i for i, p in enumerate(order)}
    ties = []
    for group in filter(None, (fields.get("ties") or "").split(";")):
        g = sorted(set(_positions(group, k, "ties")), key=place.get)
        if len(g) < 2 or any(p not in place for p in g):
            raise InputError("a tie joins two or more of the answers", field="ties")
        if [place[p] for p in g] != list(range(place[g[0]], place[g[0]] + len(g))):
            raise InputError("tied answers must be next to each other in the order", field="ties")
        ties.append(g)
    if len({p for g in ties for p in g}) != sum(len(g) for g in ties):
        raise InputError("an answer is in two tie groups", field="ties")

    ratings, given = [], 0
    for p in range(k):
        r = {}
        for c in CRITERIA:
            v = (fields.get(f"{c}_{p}") or "").strip()
            if v:
                r[c] = _int(v, f"{c}_{p}", 1, 7)
                given += 1
        ratings.append(r)
    flags = [{f: fields.get(f"flag_{f}_{p}") in ("on", "1", "true") for f in FLAGS} for p in range(k)]

    answer = {"ranking": [shown[p] for p in order], "ties": [sorted(shown[p] for p in g) for g in ties],
              "all_bad": fields.get("all_bad") in ("on", "1", "true"),
              "ratings": None, "flags": [None] * k, "critique": _text(fields, "critique") or None,
              "correction": None}
    if given:
        answer["ratings"] = [None] * k
    for p in range(k):  # back to the items' answer order
        answer["flags"][shown[p]] = flags[p]
        if given:
            answer["ratings"][shown[p]] = ratings[p]
    cp, ctext = (fields.get("correct_p") or "").strip(), _text(fields, "correction")
    if cp:
        p = _int(cp, "correct_p", 0, k - 1)
        if not ctext:
            raise InputError("write the corrected answer (or choose no answer to correct)", field="correction")
        if completions is not None and ctext == completions[shown[p]].strip():
            raise InputError("the correction is the same as the answer: edit it, or choose no answer to correct",
                             field="correction")
        answer["correction"] = {"index": shown[p], "text": ctext}
    elif ctext:
        raise InputError("choose which answer your correction replaces", field="correct_p")
    return answer


def demonstration_answer(fields: Mapping) -> dict:
    text = _text(fields, "answer")
    if not text:
        raise InputError("write the answer", field="answer")
    return {"text": text}


def ranking_of(fields: Mapping, k: int) -> dict:
    """A reviewer's or admin's ranking typed as answer numbers best → worst ("2 1 3 4", 1-based, '='
    for ties: "2=1 3 4") → {"ranking", "ties"} in 0-based answer indices."""
    text = (fields.get("ranking") or "").strip()
    groups = [g for g in re.split(r"[\s,>]+", text) if g]
    try:
        groups = [[int(x) - 1 for x in g.split("=")] for g in groups]
    except ValueError:
        raise InputError("write answer numbers best first, e.g. 2 1 3 4 (2=1 for a tie)", field="ranking") from None
    flat = [i for g in groups for i in g]
    if sorted(flat) != list(range(k)):
        raise InputError(f"name each of the answers 1–{k} once", field="ranking")
    return {"ranking": flat, "ties": [sorted(g) for g in groups if len(g) > 1]}


# ---------------------------------------------------------------- progress and agreement


def progress(db, project: Project) -> dict:
    items = db.execute(select(func.count(), func.sum(case((Item.ready, 1), else_=0)),
                              func.sum(case((Item.n_done >= project.overlap, 1), else_=0)))
                       .where(Item.project_id == project.id)).one()
    total, ready, complete = items[0] or 0, items[1] or 0, items[2] or 0
    rows = db.execute(select(User.username, Task.status, func.count()).join(User, User.id == Task.user_id)
                      .where(Task.project_id == project.id).group_by(User.username, Task.status)).all()
    people: dict[str, dict] = {}
    for name, status, n in rows:
        p = people.setdefault(name, {"submitted": 0, "assigned": 0, "skipped": 0, "median_s": None, "timed": 0})
        p["skipped" if status == "released" else status] += n
    # speed: the median of each labeler's timed submissions (a median, so one task left open over
    # lunch does not make a fast labeler look slow)
    times: dict[str, list[int]] = {}
    for name, ms in db.execute(select(User.username, Task.elapsed_ms).join(User, User.id == Task.user_id)
                               .where(Task.project_id == project.id, Task.status == "submitted",
                                      Task.elapsed_ms.is_not(None))).all():
        times.setdefault(name, []).append(ms)
    for name, ms in times.items():
        ms.sort()
        mid = len(ms) // 2
        people[name]["median_s"] = (ms[mid] if len(ms) % 2 else (ms[mid - 1] + ms[mid]) / 2) / 1000
        people[name]["timed"] = len(ms)
    submitted = sum(p["submitted"] for p in people.values())
    target = ready * project.overlap
    return {"n_items": total, "ready": ready, "complete": complete, "submitted": submitted, "target": target,
            "percent": round(100 * submitted / target, 1) if target else 0.0,
            "labelers": dict(sorted(people.items()))}


def agreement(db, project: Project) -> dict:
    rows = db.execute(select(Task.item_id, User.username, Task.answer).join(User, User.id == Task.user_id)
                      .where(Task.project_id == project.id, Task.status == "submitted")).all()
    gold = dict(db.execute(select(Item.id, Item.gold).where(Item.project_id == project.id,
                                                            Item.gold.is_not(None))).all())
    by_item: dict[int, dict] = {}
    for item_id, name, answer in rows:
        if answer and "ranking" in answer:
            by_item.setdefault(item_id, {})[name] = ranks(answer["ranking"], answer.get("ties"))
    items = [{"id": i, "rankings": r,
              "gold": ranks(gold[i]["ranking"], gold[i].get("ties")) if i in gold else None}
             for i, r in by_item.items()]
    return summarize(items)


def new_secret() -> str:
    return secrets.token_hex(32)
