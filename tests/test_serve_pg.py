"""The chat tables, the page API and the export on a real PostgreSQL server (CI starts one)."""
from __future__ import annotations

import json


from alignloop.feedback.testing import add_account, chat_client
from alignloop.serve import load_models
from alignloop.serve.app import Settings, create_app, serve_in_thread
from alignloop.serve.export import export


def last_event(resp) -> dict:
    frame = resp.text.strip().split("\n\n")[-1]
    return json.loads(frame.split("data: ", 1)[1])


def test_chat_and_export_on_postgresql(pg_url, micro_copy):
    from alignloop.db import connect, migrate
    from alignloop.feedback.testing import postgres_database
    with postgres_database(pg_url) as url:
        db = connect(url)
        migrate(db)
        served = load_models({"a": micro_copy / "pretrain", "b": micro_copy / "pretrain"}, micro_copy)
        add_account(db, "pat", "pat-password")
        with serve_in_thread(create_app(served, Settings(max_tokens_limit=24), db)) as base:
            c = chat_client(base, "pat", "pat-password")
            first = c.post("/api/chat/send", json={"model": "a", "content": "Name a country."})
            a1 = last_event(first)["message"]
            a2 = last_event(c.post("/api/chat/regenerate", json={"message_id": a1["id"]}))["message"]
            c.post(f"/api/messages/{a1['id']}/feedback", json={"rating": "up", "reason": "fine"}).raise_for_status()
            c.post(f"/api/messages/{a2['id']}/feedback", json={"rating": "down", "reason": "wrong"}).raise_for_status()
            battle = c.post("/api/arena/battles", json={"content": "Say hello."})
            bid = json.loads(battle.text.split("data: ", 1)[1].split("\n", 1)[0])["battle_id"]
            assert c.post(f"/api/arena/battles/{bid}/vote", json={"winner": "b"}).status_code == 200
            assert [r["battles"] for r in c.get("/api/arena/leaderboard").json()] == [1, 1]
        r = export(micro_copy, db_url=url, out=micro_copy / "pairs.jsonl")
        db.dispose()
    got = [json.loads(x) for x in (micro_copy / "pairs.jsonl").read_text().splitlines()] if r["files"] else []
    expected = (a1["content"] != a2["content"] and bool(a1["content"].strip() and a2["content"].strip()))
    assert len([p for p in got if p["prompt"][0]["content"] == "Name a country."]) == int(expected)
    assert r["counts"].get("arena_pairs", 0) + r["counts"].get("skipped_pairs", 0) >= 1
    assert all(p["labeler"] == "pat" and p["source"] in ("chat", "arena") and p["time"] for p in got)
