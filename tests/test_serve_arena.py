"""The arena's Bradley–Terry fit on hand-made votes, and the chat migration on a real database."""
from __future__ import annotations

import math
import random

import pytest

from alignloop.serve import arena


def strength_ratio(scores, a, b):
    return 10 ** ((scores[a] - scores[b]) / 400)


def test_two_models_maximum_likelihood():
    # A beats B 8 times out of 10: the MLE of p_A / p_B is 8/2 = 4.
    votes = [("A", "B", "a")] * 8 + [("A", "B", "b")] * 2
    s = arena.fit(votes, prior=0)
    assert strength_ratio(s, "A", "B") == pytest.approx(4.0, rel=1e-6)
    assert (s["A"] + s["B"]) / 2 == pytest.approx(1000)          # geometric mean 1 → mean score 1000


def test_ties_count_half_and_sides_do_not_matter():
    # 3 wins, 1 loss and 2 ties for A = 4 "wins" vs 2: ratio 2, whichever side A was shown on.
    votes = [("A", "B", "a")] * 2 + [("B", "A", "b")] + [("A", "B", "b")] + [("A", "B", "tie"), ("B", "A", "both_bad")]
    s = arena.fit(votes, prior=0)
    assert strength_ratio(s, "A", "B") == pytest.approx(2.0, rel=1e-6)


def test_three_models_recover_true_strengths_and_order_independence():
    rng = random.Random(0)
    true = {"x": 4.0, "y": 2.0, "z": 1.0}
    votes = []
    for _ in range(3000):
        a, b = rng.sample(sorted(true), 2)
        votes.append((a, b, "a" if rng.random() < true[a] / (true[a] + true[b]) else "b"))
    s = arena.fit(votes, prior=0)
    assert strength_ratio(s, "x", "z") == pytest.approx(4.0, rel=0.15)
    assert strength_ratio(s, "y", "z") == pytest.approx(2.0, rel=0.15)
    shuffled = votes[:]
    rng.shuffle(shuffled)
    s2 = arena.fit(shuffled, prior=0)
    assert all(s[m] == pytest.approx(s2[m]) for m in s)                 # unlike online Elo


def test_prior_keeps_a_model_without_wins_finite():
    s = arena.fit([("A", "B", "a")] * 5, prior=0.5)
    assert all(math.isfinite(v) for v in s.values())
    assert strength_ratio(s, "A", "B") == pytest.approx(5.5 / 0.5, rel=1e-6)


def test_leaderboard_intervals_and_counts():
    votes = [("A", "B", "a")] * 30 + [("A", "B", "b")] * 10 + [("B", "C", "a")] * 20 + [("A", "C", "tie")] * 4
    rows = arena.leaderboard(votes, ["A", "B", "C", "D"], rounds=200)
    assert [r["model"] for r in rows] == ["A", "B", "C", "D"]
    by = {r["model"]: r for r in rows}
    for r in rows[:3]:
        assert r["lo"] <= r["score"] <= r["hi"]
    assert by["A"]["lo"] < by["A"]["score"] < by["A"]["hi"]                # a real interval
    assert by["A"]["battles"] == 44 and by["A"]["wins"] == 30 and by["A"]["ties"] == 4
    assert by["D"]["battles"] == 0 and by["D"]["score"] is None          # served, never voted on: last
    # more votes, same proportions → a narrower interval
    wide = by["A"]["hi"] - by["A"]["lo"]
    narrow = {r["model"]: r for r in arena.leaderboard(votes * 4, rounds=200)}["A"]
    assert narrow["hi"] - narrow["lo"] < wide
    assert arena.leaderboard([]) == []


def test_chat_migration_creates_prefixed_tables(tmp_path):
    from sqlalchemy import inspect

    from alignloop.db import connect, database_url, migrate
    db = connect(database_url(tmp_path))
    migrate(db)
    migrate(db)  # idempotent
    names = set(inspect(db).get_table_names())
    assert {"chat_conversations", "chat_messages", "chat_feedback", "chat_battles", "chat_votes"} <= names
    # the ORM and the migration agree on every column
    from alignloop.serve import tables
    for t in (tables.Conversation, tables.Message, tables.Feedback, tables.Battle, tables.Vote):
        cols = {c["name"] for c in inspect(db).get_columns(t.__tablename__)}
        assert cols == {c.name for c in t.__table__.columns}, t.__tablename__
    db.dispose()
