"""The OpenAI-compatible API: the real `openai` client against a real uvicorn server on loopback,
serving the micro model under two names."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from alignloop.feedback.testing import add_account, chat_client
from alignloop.serve import load_models
from alignloop.serve.app import Settings, create_app, serve_in_thread

HI = [{"role": "user", "content": "What is the capital of the first country?"}]


@pytest.fixture(scope="module")
def server(micro_run, tmp_path_factory):
    from alignloop.db import connect, database_url, migrate
    served = load_models({"a": micro_run / "pretrain", "b": micro_run / "pretrain"}, micro_run, max_batch=32)
    db = connect(database_url(tmp_path_factory.mktemp("serve-db")))
    migrate(db)
    app = create_app(served, Settings(max_batch=32, max_tokens_limit=200, max_n=8), db)
    for name in ("me", "other"):
        add_account(db, name, f"{name}-password")
    with serve_in_thread(app) as url:
        yield url, app
    db.dispose()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_list_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["a", "b"]
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_plain_completion_with_usage(client, server):
    r = client.chat.completions.create(model="a", messages=HI, max_tokens=20)
    assert r.object == "chat.completion" and r.model == "a" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    tok = server[1].state.gen.models["a"].tok
    assert r.usage.prompt_tokens == len(tok.render_prompt(HI))
    assert 1 <= r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_choices(client):
    r = client.chat.completions.create(model="b", messages=HI, n=3, max_tokens=12, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) >= 2          # three samples, not one copied
    assert r.usage.completion_tokens <= 3 * 12


def test_seed_reproduces(client):
    kw = dict(model="a", messages=HI, max_tokens=16, temperature=1.0, seed=1234)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content


def greedy(client, **kw):
    return client.chat.completions.create(model="a", messages=HI, temperature=0, max_tokens=40, **kw).choices[0]


def test_stop_list_cuts_the_answer(client):
    full = greedy(client).message.content
    assert len(full) >= 6, full
    k = len(full) // 2
    stop = full[k: k + 3]
    expected = full[: full.find(stop)]
    cut = greedy(client, stop=["\u2603never", stop])
    assert cut.message.content == expected and cut.finish_reason == "stop"
    assert greedy(client, stop=stop).message.content == expected       # a plain string works too


def test_streaming_with_usage(client):
    full = greedy(client)
    stream = client.chat.completions.create(model="a", messages=HI, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1                                              # streamed in pieces
    assert "".join(content) == full.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_bad_temperature_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=HI, temperature=3.5)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=HI)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"


BAD = [
    ("malformed json", b"{\"model\": \"a\", \"messages\": [", None),
    ("missing messages", {"model": "a"}, "messages"),
    ("messages not a list", {"model": "a", "messages": "hi"}, "messages"),
    ("empty conversation", {"model": "a", "messages": []}, "messages"),
    ("unknown role", {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("empty content", {"model": "a", "messages": [{"role": "user", "content": " "}]}, "messages[0].content"),
    ("n beyond the limit", {"model": "a", "messages": HI, "n": 9}, "n"),
    ("n of zero", {"model": "a", "messages": HI, "n": 0}, "n"),
    ("max_tokens beyond the limit", {"model": "a", "messages": HI, "max_tokens": 201}, "max_tokens"),
    ("prompt longer than the context", {"model": "a", "messages": [{"role": "user", "content": "word " * 400}]},
     "messages"),
    ("five stop strings", {"model": "a", "messages": HI, "stop": list("abcde")}, "stop"),
    ("top_p of zero", {"model": "a", "messages": HI, "top_p": 0}, "top_p"),
    ("temperature as text", {"model": "a", "messages": HI, "temperature": "hot"}, "temperature"),
    ("a huge seed", {"model": "a", "messages": HI, "seed": 2**70}, "seed"),
    ("body not an object", [1, 2], None),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_400(server, name, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server[0] + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err


def test_max_tokens_beyond_context_is_named(server):
    # 200 new tokens fit the limit but not the 256-token context after this prompt
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": "a", "messages": [
        {"role": "user", "content": "word " * 60}], "max_tokens": 200})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_oversized_body_is_refused(server):
    big = json.dumps({"model": "a", "messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}).encode()
    r = httpx.post(server[0] + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(server):
    r = httpx.get(server[0] + "/v1/engines")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server[0] + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_concurrent_requests_share_a_batch(server, client):
    sched = server[1].state.gen.scheduler
    before = dict(sched.stats)
    results, errors = [], []

    def one(i):
        try:
            kw = dict(temperature=0) if i % 2 else dict(temperature=1.0, top_p=0.9)  # mixed settings, one batch
            s = client.chat.completions.create(model="a", messages=HI, max_tokens=24, stream=i % 3 == 0, **kw)
            if i % 3 == 0:
                results.append("".join(c.choices[0].delta.content or "" for c in s if c.choices))
            else:
                results.append(s.choices[0].message.content)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 12
    rows = sched.stats["rows"] - before["rows"]
    batches = sched.stats["batches"] - before["batches"]
    assert rows == 12 and batches < 12                                   # batched, not one at a time
    assert sched.stats["max_rows"] >= 2


def test_client_that_disconnects_frees_its_rows(server):
    sched = server[1].state.gen.scheduler
    before = sched.stats["cancelled_rows"]
    body = {"model": "a", "messages": HI, "max_tokens": 200, "stream": True, "stop": ["\u2603"], "n": 2,
            "temperature": 1.0, "seed": 7}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():  # wait for generated text, then hang up
            if '"delta": {"content"' in line:
                break
    deadline = time.time() + 20
    while sched.stats["cancelled_rows"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert sched.stats["cancelled_rows"] > before


def test_api_keys(micro_run):
    served = load_models({"a": micro_run / "pretrain"}, micro_run)
    app = create_app(served, Settings(api_keys=["k-one", "k-two"]))
    with serve_in_thread(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="k-two", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["a"]
        assert ok.chat.completions.create(model="a", messages=HI, max_tokens=4).choices


def test_openapi_schema_has_no_server_errors(server, tmp_path):
    """schemathesis against the published schema: every operation, bounded examples, no 5xx."""
    url = server[0]
    schema = httpx.get(url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/api/arena/battles" in schema["paths"]
    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "20", "--workers", "1", "--phases", "examples,coverage,fuzzing",
         "--request-timeout", "60", "--suppress-health-check", "all", "--seed", "1"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    counts = re.search(r"(\d+) generated, (\d+) passed", tail)
    assert counts and int(counts[1]) >= 100 and counts[1] == counts[2], tail


def events(resp) -> list[tuple[str, dict]]:
    out = []
    for frame in resp.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_page_api_conversation_tree(server):
    url = server[0]
    me, other = chat_client(url, "me", "me-password"), chat_client(url, "other", "other-password")
    r = me.post("/api/chat/send", json={"model": "a", "content": "first question", "max_tokens": 8})
    ev = events(r)
    assert [e for e, _ in ev][0] == "meta" and ev[-1][0] == "done"
    conv, q1 = ev[0][1]["conversation_id"], ev[0][1]["user_message"]["id"]
    a1 = ev[-1][1]["message"]
    assert a1["parent_id"] == q1 and a1["role"] == "assistant"
    # regenerate: a sibling of a1; answering the user message again does the same
    a2 = events(me.post("/api/chat/regenerate", json={"message_id": a1["id"]}))[-1][1]["message"]
    a3 = events(me.post("/api/chat/regenerate", json={"message_id": q1, "model": "b"}))[-1][1]["message"]
    assert a2["parent_id"] == a3["parent_id"] == q1 and a3["model"] == "b"
    # edit: a new first question is a sibling of the old one (same parent: none)
    ev = events(me.post("/api/chat/send", json={"model": "a", "content": "edited", "conversation_id": conv,
                                                 "parent_id": None, "max_tokens": 4}))
    assert ev[0][1]["user_message"]["parent_id"] is None
    tree = me.get(f"/api/conversations/{conv}").json()
    assert len(tree["messages"]) == 6 and tree["title"] == "first question"
    # a user message must follow an assistant message
    r = me.post("/api/chat/send", json={"model": "a", "content": "x", "conversation_id": conv, "parent_id": q1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parent_id"
    # feedback: only on assistant messages, replaced when given again
    assert me.post(f"/api/messages/{q1}/feedback", json={"rating": "up"}).status_code == 404
    assert me.post(f"/api/messages/{a1['id']}/feedback", json={"rating": "down", "reason": "meh"}).json()["rating"] == "down"
    assert me.post(f"/api/messages/{a1['id']}/feedback", json={"rating": "up"}).json() == {
        "message_id": a1["id"], "rating": "up", "reason": ""}
    assert me.post(f"/api/messages/{a1['id']}/feedback", json={"rating": "meh"}).status_code == 400
    # someone else sees none of it
    assert other.get(f"/api/conversations/{conv}").status_code == 404
    assert other.get("/api/conversations").json() == []
    assert other.post(f"/api/messages/{a1['id']}/feedback", json={"rating": "up"}).status_code == 404
    assert other.post("/api/chat/regenerate", json={"message_id": a1["id"]}).status_code == 404
    assert me.post("/api/chat/send", json={"model": "zz", "content": "x"}).status_code == 404


def test_page_api_arena_votes(server):
    url = server[0]
    me, other = chat_client(url, "me", "me-password"), chat_client(url, "other", "other-password")
    ev = events(me.post("/api/arena/battles", json={"content": "Which is the largest country?"}))
    assert ev[0][0] == "meta" and ev[-1][0] == "end"
    assert sorted(d["side"] for e, d in ev if e == "done") == ["a", "b"]
    battle = ev[0][1]["battle_id"]
    assert other.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"}).status_code == 404
    assert me.post(f"/api/arena/battles/{battle}/vote", json={"winner": "left"}).status_code == 400
    r = me.post(f"/api/arena/battles/{battle}/vote", json={"winner": "both_bad"}).json()
    assert {r["model_a"], r["model_b"]} == {"a", "b"}
    assert me.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"}).status_code == 409
    board = me.get("/api/arena/leaderboard").json()
    assert {row["model"] for row in board} == {"a", "b"} and all(row["ties"] >= 1 for row in board)


def test_arena_needs_two_models_and_skips_the_ppo_alias(micro_run, tmp_path):
    from alignloop.db import connect, database_url, migrate
    db = connect(database_url(tmp_path))
    migrate(db)
    one = load_models({"round-1/ppo": micro_run / "pretrain", "ppo": micro_run / "pretrain"}, micro_run)
    with serve_in_thread(create_app(one, Settings(open=True), db)) as url:   # open: no account needed
        r = httpx.post(url + "/api/arena/battles", json={"content": "hi"})
        assert r.status_code == 400 and "two models" in r.json()["error"]["message"]
        assert [row["model"] for row in httpx.get(url + "/api/arena/leaderboard").json()] == ["round-1/ppo"]
        assert "ppo" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]   # the API serves both
    db.dispose()


def test_burst_beyond_the_queue_gets_429s_and_the_rest_completes(micro_run):
    """A queue of 2 behind batches of 2: of 16 requests fired at once (half of them streamed), those that
    find the queue full get OpenAI's 429 (openai.RateLimitError, also for a stream: the status comes
    before any chunk); every other one completes."""
    served = load_models({"a": micro_run / "pretrain"}, micro_run)
    app = create_app(served, Settings(max_batch=2, max_queue=2))
    sched = app.state.gen.scheduler
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        go = threading.Barrier(16)
        done, refused, other = [], [], []

        def one(i):
            go.wait()
            try:
                kw = {"model": "a", "messages": HI, "max_tokens": 48, "temperature": 1.0, "seed": i}
                if i % 2:
                    chunks = list(client.chat.completions.create(stream=True, **kw))
                    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                else:
                    finish = [client.chat.completions.create(**kw).choices[0].finish_reason]
                done.append(finish)
            except openai.RateLimitError as e:
                refused.append(e)
            except Exception as e:  # noqa: BLE001 — anything else is a failure of the test
                other.append(e)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not other, other
        assert refused and done and len(done) + len(refused) == 16
        assert all(f in (["stop"], ["length"]) for f in done), done
        assert sched.stats["refused"] == len(refused) and sched.stats["max_rows"] <= 2
        err = refused[0]
        assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
        assert set(err.body) == {"message", "type", "param", "code"} and err.body["code"] == "queue_full"
        # the burst is over: the server answers again
        assert client.chat.completions.create(model="a", messages=HI, max_tokens=4).choices


def test_imports_go_one_way():
    """No module of alignloop imports itself back through others, counting imports inside functions
    too (a lazy import hides a cycle from Python, not from the reader): `serve/app.py` and `serve/web.py`
    once did."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    files = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (root / "alignloop").rglob("*.py")}
    deps = {}
    for name, f in files.items():
        deps[name] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from pkg import mod` depends on the module mod, not on the package's __init__
                found = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names]
            else:
                continue
            deps[name] |= {m for m in found if m in files and m != name}

    def back_to(start):  # a path of imports from start's dependencies back to start, if any
        seen, todo = set(), [(d, [start, d]) for d in deps[start]]
        while todo:
            m, path = todo.pop()
            if m == start:
                return path
            if m not in seen:
                seen.add(m)
                todo += [(d, path + [d]) for d in deps[m]]
        return None
    cycles = [" → ".join(p) for m in files if (p := back_to(m))]
    assert not cycles, cycles
