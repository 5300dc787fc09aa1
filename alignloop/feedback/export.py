"""Export the people's feedback into the loop: new, versioned files in `RUN/round-N/`, never over
existing ones — `human-rankings-<UTC time>.jsonl`, `human-demonstrations-<time>.jsonl` and
`human-pairs-<time>.jsonl` (the reward stage reads the newest of each; `--labelers human` waits for one).

- rankings: one record per (item, labeler), the raw per-labeler rankings (no aggregation), plus one
  per reviewer's settled ranking (`"review": true`);
- demonstrations: written demonstrations and corrections (a correction is a demonstration);
- pairs: each correction is also preferred to the answer it replaces.
Every comparison (ranking or pair) carries `"source": "label"`, its `labeler` and its `time` (ISO 8601,
UTC: when it was submitted or settled). Each export holds everything collected so far, so exporting
twice loses nothing and the older file stays as it was. Labeler names can be replaced by stable
pseudonyms: HMAC-SHA256 of the name under a secret kept in the database, so the same person gets the
same pseudonym in every export and round.
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from alignloop.accounts.models import User
from alignloop.feedback import store
from alignloop.feedback.models import Item, Project, Task
from alignloop.io import write_jsonl
from alignloop.rundir import by_version, round_dir, versioned_path

FILES = {"rankings": "human-rankings", "demonstrations": "human-demonstrations", "pairs": "human-pairs"}


def pseudonym(secret: str, name: str) -> str:
    return "labeler-" + hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()[:10]


def default_round(run_dir: Path) -> int:
    """The newest round folder of the run, or 1."""
    rounds = [int(p.name[6:]) for p in Path(run_dir).glob("round-*") if p.is_dir() and p.name[6:].isdigit()]
    return max(rounds, default=1)


def collect(Sess: sessionmaker, pseudonymize: bool = False, project: str | None = None) -> dict[str, list[dict]]:
    secret = store.setting(Sess, "pseudonym_secret", store.new_secret) if pseudonymize else ""
    with Sess() as db:
        q = (select(Task, Item, Project.name, User.username).join(Item, Item.id == Task.item_id)
             .join(Project, Project.id == Task.project_id).join(User, User.id == Task.user_id)
             .where(Task.status == "submitted").order_by(Task.project_id, Task.item_id, Task.id))
        reviews = (select(Item, Project.name, User.username).join(Project, Project.id == Item.project_id)
                   .join(User, User.id == Item.resolved_by).where(Item.resolution.is_not(None))
                   .order_by(Item.id))
        if project is not None:
            q, reviews = q.where(Project.name == project), reviews.where(Project.name == project)
        rows, review_rows = db.execute(q).all(), db.execute(reviews).all()

    def who(name):
        return pseudonym(secret, name) if pseudonymize else name

    def when(t) -> str | None:
        return None if t is None else (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()

    rankings, demos, pairs = [], [], []
    for task, item, pname, username in rows:
        a = task.answer or {}
        ids = {"item_id": item.id, "project": pname, "source": "label", "time": when(task.submitted_at)}
        if "text" in a:  # a written demonstration
            demos.append({"messages": item.prompt + [{"role": "assistant", "content": a["text"]}],
                          "labeler": who(username), "kind": "demonstration", **ids})
            continue
        rec = {"prompt": item.prompt, "completions": item.completions, "ranking": a["ranking"],
               "labeler": who(username)}
        if a.get("ties"):
            rec["ties"] = a["ties"]
        rec["all_bad"] = bool(a.get("all_bad"))
        if a.get("ratings"):
            rec["ratings"] = a["ratings"]
        rec["flags"] = a.get("flags")
        if a.get("critique"):
            rec["critique"] = a["critique"]
        if a.get("correction"):
            c = a["correction"]
            rec["correction"] = c
            demos.append({"messages": item.prompt + [{"role": "assistant", "content": c["text"]}],
                          "labeler": who(username), "kind": "correction", **ids})
            pairs.append({"prompt": item.prompt, "chosen": c["text"], "rejected": item.completions[c["index"]],
                          "labeler": who(username), **ids})
        rankings.append({**rec, **ids})
    for item, pname, username in review_rows:
        r = item.resolution
        rankings.append({"prompt": item.prompt, "completions": item.completions, "ranking": r["ranking"],
                         **({"ties": r["ties"]} if r.get("ties") else {}), "labeler": who(username),
                         "review": True, "item_id": item.id, "project": pname, "source": "label",
                         "time": when(item.resolved_at)})
    return {"rankings": rankings, "demonstrations": demos, "pairs": pairs}


def export(Sess: sessionmaker, run_dir, round: int | None = None, pseudonymize: bool = False,
           project: str | None = None) -> dict:
    """Write three new files into RUN/round-N/ (existing files are never touched); returns
    {"dir", "round", "counts": {file name: n}, "files": {kind: path}}."""
    n = round if round is not None else default_round(run_dir)
    out = round_dir(run_dir, n)
    data = collect(Sess, pseudonymize, project)
    files = {}
    for kind, records in data.items():
        path = versioned_path(out, FILES[kind])
        write_jsonl(path, records)
        files[kind] = path
    return {"dir": out, "round": n, "files": files,
            "counts": {files[kind].name: len(r) for kind, r in data.items()}}


def newest_export(folder: Path, kind: str) -> Path | None:
    """The newest `human-<kind>-<time>.jsonl` of a round folder (kind: rankings, demonstrations, pairs)."""
    found = by_version(Path(folder).glob(f"{FILES[kind]}-*.jsonl"))
    return found[-1] if found else None
