"""Export the people's feedback into the loop: `RUN/round-N/rankings.jsonl`, `demonstrations.jsonl`
and `pairs.jsonl` (formats in docs/formats.md; the reward stage and `--labelers human` read them).

- rankings.jsonl: one record per (item, labeler), the raw per-labeler rankings (no aggregation), plus
  one per reviewer's settled ranking (`"review": true`).
- demonstrations.jsonl: written demonstrations and corrections (a correction is a demonstration).
- pairs.jsonl: each correction is also preferred to the answer it replaces.
Labeler names can be replaced by stable pseudonyms: HMAC-SHA256 of the name under a secret kept in
the database, so the same person gets the same pseudonym in every export and round.
Each file is written atomically (whole or not at all); all three are always written, so a re-export
never leaves a stale file beside fresh ones.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from alignloop.feedback import store
from alignloop.feedback.models import Item, Project, Task, User
from alignloop.io import write_jsonl
from alignloop.rundir import round_dir


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

    rankings, demos, pairs = [], [], []
    for task, item, pname, username in rows:
        a, ids = task.answer or {}, {"item_id": item.id, "project": pname}
        if "text" in a:  # a written demonstration
            demos.append({"messages": item.prompt + [{"role": "assistant", "content": a["text"]}],
                          "labeler": who(username), "source": "demonstration", **ids})
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
                          "labeler": who(username), "source": "correction", **ids})
            pairs.append({"prompt": item.prompt, "chosen": c["text"], "rejected": item.completions[c["index"]],
                          "labeler": who(username), **ids})
        rankings.append({**rec, **ids})
    for item, pname, username in review_rows:
        r = item.resolution
        rankings.append({"prompt": item.prompt, "completions": item.completions, "ranking": r["ranking"],
                         **({"ties": r["ties"]} if r.get("ties") else {}), "labeler": who(username),
                         "review": True, "item_id": item.id, "project": pname})
    return {"rankings.jsonl": rankings, "demonstrations.jsonl": demos, "pairs.jsonl": pairs}


def export(Sess: sessionmaker, run_dir, round: int | None = None, pseudonymize: bool = False,
           project: str | None = None) -> dict:
    """Write the three files into RUN/round-N/; returns {"dir": path, "counts": {file: n}}."""
    n = round if round is not None else default_round(run_dir)
    out = round_dir(run_dir, n)
    data = collect(Sess, pseudonymize, project)
    for name, records in data.items():
        write_jsonl(out / name, records)
    return {"dir": out, "round": n, "counts": {name: len(r) for name, r in data.items()}}
