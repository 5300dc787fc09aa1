"""`alignloop serve export`: feedback from the chat page and the arena, as reward-model training data.

- a regenerate pair: two answers to the same question where the user thumbed one up and the other
  down → `{"prompt": messages, "chosen", "rejected"}` (every up × every down among the siblings);
- an arena vote for A or B → the same pair shape (ties and "both bad" say nothing about the order);
- `--format rankings` writes each comparison as a K=2 ranking instead:
  `{"prompt", "completions", "ranking": [best, worst], …}` (docs/formats.md, "Rankings");
- a thumb on an answer that is not part of a pair → `chat-feedback-<time>.jsonl`:
  `{"prompt", "completion", "rating": "up"|"down", "reason", …}`.
Every record carries `source` ("chat" for thumbs, "arena" for votes), `labeler` (the account's
username, or `anon:<hash>` on an `--open` server) and `time` (ISO 8601, UTC), so the reward stage can
choose (`--sources`) and people can filter.

Files are new and versioned — by default `RUN/round-N/chat-pairs-<time>.jsonl` (or chat-rankings-…)
in the run's newest round folder (round-1 when it has none) — and never replace an existing file; each
export holds everything so far. The reward stage reads them only when asked: `--sources …,chat,arena`.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import timezone
from pathlib import Path

from sqlalchemy import select

from alignloop.db import connect, database_url, migrate, sessions
from alignloop.errors import InputError
from alignloop.io import write_jsonl
from alignloop.rundir import versioned_path
from alignloop.serve.tables import Battle, Conversation, Feedback, Message, Vote


def newest_round(run_dir: Path) -> Path:
    rounds = sorted(int(p.name[6:]) for p in Path(run_dir).glob("round-*") if p.is_dir() and p.name[6:].isdigit())
    return Path(run_dir) / f"round-{rounds[-1] if rounds else 1}"


def _time(t) -> str:
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()


def collect(db) -> tuple[list[dict], list[dict], dict]:
    """(comparisons {prompt, chosen, rejected, source, labeler, time}, thumbs {prompt, completion, rating,
    reason, source, labeler, time}, counts)."""
    pairs, thumbs = [], []
    counts = defaultdict(int)
    with sessions(db)() as s:
        owner = {c.id: c.user for c in s.scalars(select(Conversation))}
        msgs = {m.id: m for m in s.scalars(select(Message).order_by(Message.created_at, Message.id))}
        rated: dict[str, Feedback] = {}
        for f in s.scalars(select(Feedback).order_by(Feedback.created_at)):
            m = msgs.get(f.message_id)
            if m is not None and owner.get(m.conversation_id) == f.user:  # the conversation's own user
                rated[m.id] = f
        votes = list(s.execute(select(Battle, Vote).join(Vote).order_by(Vote.created_at)))

    def history(message_id: str | None) -> list[dict]:
        out = []
        while message_id is not None:
            m = msgs[message_id]
            out.append({"role": m.role, "content": m.content})
            message_id = m.parent_id
        return out[::-1]

    siblings = defaultdict(list)
    for mid in rated:
        siblings[msgs[mid].parent_id].append(mid)
    used = set()
    for parent, kids in siblings.items():
        ups = [k for k in kids if rated[k].rating == "up"]
        downs = [k for k in kids if rated[k].rating == "down"]
        for u in ups:
            for d in downs:
                chosen, rejected = msgs[u].content, msgs[d].content
                if not chosen.strip() or not rejected.strip() or chosen == rejected:
                    counts["skipped_pairs"] += 1
                    continue
                pairs.append({"prompt": history(parent), "chosen": chosen, "rejected": rejected, "source": "chat",
                              "labeler": rated[u].user,
                              "time": _time(max(rated[u].created_at, rated[d].created_at))})
                used.update((u, d))
                counts["regenerate_pairs"] += 1
    for mid, f in rated.items():
        if mid in used or not msgs[mid].content.strip():
            continue
        thumbs.append({"prompt": history(msgs[mid].parent_id), "completion": msgs[mid].content,
                       "rating": f.rating, "reason": f.reason, "source": "chat", "labeler": f.user,
                       "time": _time(f.created_at)})
        counts["thumbs"] += 1
    for b, v in votes:
        if v.winner not in ("a", "b") or b.answer_a is None or b.answer_b is None:
            counts["ties"] += 1
            continue
        chosen, rejected = (b.answer_a, b.answer_b) if v.winner == "a" else (b.answer_b, b.answer_a)
        if not chosen.strip() or not rejected.strip() or chosen == rejected:
            counts["skipped_pairs"] += 1
            continue
        pairs.append({"prompt": b.prompt, "chosen": chosen, "rejected": rejected, "source": "arena",
                      "labeler": v.user, "time": _time(v.created_at)})
        counts["arena_pairs"] += 1
    return pairs, thumbs, dict(counts)


def export(run_dir: Path, db_url: str | None = None, out: Path | None = None, feedback_out: Path | None = None,
           fmt: str = "pairs") -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("run directory not found", file=run_dir)
    if db_url is None and not (run_dir / "alignloop.db").exists():
        raise InputError("no chat database here (serve the run first: alignloop serve RUN)",
                         file=run_dir / "alignloop.db")
    db = connect(database_url(run_dir, db_url))
    try:
        migrate(db)
        pairs, thumbs, counts = collect(db)
    finally:
        db.dispose()
    folder = newest_round(run_dir)
    for given, flag in ((out, "--out"), (feedback_out, "--feedback-out")):
        if given is not None and Path(given).exists():
            raise InputError("the file exists; an export never replaces one (name a new file, or leave the flag "
                             "out for a new versioned file)", file=given, field=flag)
    if fmt == "pairs":
        records = pairs
    else:
        records = [{"prompt": p["prompt"], "completions": [p["chosen"], p["rejected"]], "ranking": [0, 1],
                    **{k: p[k] for k in ("source", "labeler", "time")}} for p in pairs]
    written = {}
    if records:
        out = Path(out) if out else versioned_path(folder, "chat-pairs" if fmt == "pairs" else "chat-rankings")
        write_jsonl(out, records)
        written["comparisons"] = str(out)
    if thumbs:
        feedback_out = Path(feedback_out) if feedback_out else versioned_path(folder, "chat-feedback")
        write_jsonl(feedback_out, thumbs)
        written["thumbs"] = str(feedback_out)
    return {"counts": counts, "files": written, "folder": str(folder), "n_comparisons": len(records),
            "n_thumbs": len(thumbs)}
