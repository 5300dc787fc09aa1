"""One account system for both web apps, on real servers and a real database: no route answers without
a session, rate limits stop a flood of votes, a stranger's wrong passwords do not lock the real user
out, admins unlock and reset, users change their own password, and schemathesis finds no 5xx in either
app's schema."""
from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount

from alignloop.feedback.testing import add_account, chat_client, csrf_of, login, server
from alignloop.serve import load_models
from alignloop.serve.app import Settings, create_app, serve_in_thread

pytestmark = pytest.mark.slow
# Routes anyone may reach: logging in, the schema, static files, the health check; /v1 has its API keys.
PUBLIC = {"/login", "/logout", "/openapi.json", "/healthz", "/static"}


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def routes(app):
    """(method, path) of every route the app has, so that a route added later is checked too."""
    for r in app.routes:
        if isinstance(r, APIRoute):
            for m in sorted(r.methods - {"HEAD"}):
                yield m, r.path
        elif isinstance(r, Mount):
            yield "GET", r.path + "/x"
        elif hasattr(r, "methods"):  # Starlette's own (the schema)
            for m in sorted((r.methods or {"GET"}) - {"HEAD"}):
                yield m, r.path


def check_closed(url: str, app, api_prefixes: tuple[str, ...]) -> int:
    n = 0
    with httpx.Client(base_url=url, timeout=60) as c:
        for method, path in routes(app):
            if path in PUBLIC or path.startswith("/static"):
                continue
            r = c.request(method, concrete(path), json={} if method == "POST" else None)
            n += 1
            if path.startswith(api_prefixes):
                assert r.status_code == 401, (method, path, r.status_code)
            else:
                assert r.status_code == 303 and r.headers["location"].startswith("/login"), (method, path, r.status_code)
    return n


@pytest.fixture(scope="module")
def chat(micro_run, tmp_path_factory):
    from alignloop.db import connect, database_url, migrate
    run = tmp_path_factory.mktemp("accounts")
    db = connect(database_url(run))
    migrate(db)
    add_account(db, "alice", "alice-password")
    add_account(db, "bob", "bob-password")
    served = load_models({"a": micro_run / "pretrain", "b": micro_run / "pretrain"}, micro_run)
    app = create_app(served, Settings(api_keys=["k"], max_tokens_limit=8), db)
    with serve_in_thread(app) as url:
        yield url, app, db
    db.dispose()


def test_every_chat_route_needs_a_session_or_a_key(chat):
    url, app, _ = chat
    n = check_closed(url, app, ("/api/", "/v1"))
    assert n >= 12
    assert httpx.get(url + "/openapi.json").status_code == 200 and httpx.get(url + "/login").status_code == 200


def test_every_labeling_route_needs_a_session(tmp_path):
    from alignloop.feedback.app import create_app as label_app
    app = label_app(tmp_path)
    with serve_in_thread(app) as url:
        assert check_closed(url, app, ("/api/",)) >= 20
    app.state.Sess.kw["bind"].dispose()


def test_200_votes_from_one_account_are_throttled(chat):
    url, _, db = chat
    me = chat_client(url, "alice", "alice-password", local_address="127.0.0.2")
    body = me.post("/api/arena/battles", json={"content": "Say hello."}).text
    battle = re.search(r'"battle_id": "(\w+)"', body).group(1)
    codes = [me.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"}) for _ in range(200)]
    limit = Settings().votes_per_minute                                  # the documented limit: 20 a minute
    assert all(r.status_code != 429 for r in codes[:limit])
    assert all(r.status_code == 429 for r in codes[limit:])
    assert 0 < int(codes[-1].headers["retry-after"]) <= 60
    assert "at most 20 a minute per account" in codes[-1].json()["error"]["message"]
    # one vote per battle: the first counted, the others were refused
    assert codes[0].status_code in (200, 409) and all(r.status_code == 409 for r in codes[1:limit])
    # the export names the voter, the source and the time
    from alignloop.serve.export import collect
    pairs, _, _ = collect(db)
    assert all(p["labeler"] == "alice" and p["source"] == "arena" and p["time"] for p in pairs)


def test_200_votes_from_fresh_anonymous_cookies_are_throttled(micro_run, tmp_path):
    from alignloop.db import connect, database_url, migrate
    db = connect(database_url(tmp_path))
    migrate(db)
    served = load_models({"a": micro_run / "pretrain", "b": micro_run / "pretrain"}, micro_run)
    with serve_in_thread(create_app(served, Settings(open=True), db)) as url:
        assert "Open demo" in httpx.get(url + "/arena").text                 # an open server says so
        transport = httpx.HTTPTransport(local_address="127.0.0.3")
        codes = []
        for _ in range(200):
            with httpx.Client(base_url=url, timeout=60, transport=transport) as fresh:   # a new cookie each time
                codes.append(fresh.post("/api/arena/battles/nope/vote", json={"winner": "a"}).status_code)
    per_address = Settings().votes_per_minute * Settings().per_address_factor   # 80 a minute per address
    assert codes[:per_address] == [404] * per_address and set(codes[per_address:]) == {429}
    db.dispose()


def test_identical_answers_take_no_vote(chat):
    url, _, db = chat
    from alignloop.db import sessions
    from alignloop.serve.tables import Battle
    with sessions(db)() as s:
        b = Battle(user="bob", prompt=[{"role": "user", "content": "x"}], model_a="a", model_b="b",
                   answer_a="Same.", answer_b="Same.")
        s.add(b)
        s.commit()
        bid = b.id
    me = chat_client(url, "bob", "bob-password", local_address="127.0.0.4")
    r = me.post(f"/api/arena/battles/{bid}/vote", json={"winner": "a"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "identical_answers"


def test_login_throttle_unlock_reset_and_change(tmp_path):
    run = tmp_path / "run"
    from alignloop.feedback import store
    Sess = store.open_db(run)
    add_account(Sess, "root", "root-password", "admin")
    add_account(Sess, "alice", "alice-password")
    Sess.kw["bind"].dispose()

    def client(addr):
        return httpx.Client(base_url=base, timeout=60, transport=httpx.HTTPTransport(local_address=addr))

    with server(run) as base:
        stranger = client("127.0.0.2")
        codes = [login(stranger, "alice", f"guess-{i}").status_code for i in range(20)]
        assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
        r = login(stranger, "alice", "alice-password")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert login(client("127.0.0.3"), "alice", "alice-password").status_code == 303   # the real user
        # an admin unlocks: the failures of (alice, address) are forgotten
        other = client("127.0.0.5")
        assert [login(other, "alice", "nope-nope").status_code for _ in range(6)][-1] == 429
        admin = client("127.0.0.4")
        assert login(admin, "root", "root-password").status_code == 303
        page = admin.get("/admin/users").text
        uid = re.search(r'action="/admin/users/(\d+)/unlock"', page.split("alice")[1]).group(1)
        r = admin.post(f"/admin/users/{uid}/unlock", data={"csrf": csrf_of(page)}, follow_redirects=True)
        assert r.status_code == 200 and "Unlocked" in r.text
        assert login(other, "alice", "alice-password").status_code == 303
        # an admin sets a new password: alice's sessions end
        r = admin.post(f"/admin/users/{uid}/password", data={"csrf": csrf_of(page), "password": "short"})
        assert r.status_code == 400 and "at least 8" in r.text
        admin.post(f"/admin/users/{uid}/password", data={"csrf": csrf_of(page), "password": "reset-password"})
        assert other.get("/", follow_redirects=False).status_code == 303
        assert login(other, "alice", "alice-password").status_code == 401
        assert login(other, "alice", "reset-password").status_code == 303
        # alice changes her own password (the current one is asked for)
        page = other.get("/account").text
        r = other.post("/account/password", data={"csrf": csrf_of(page), "current": "wrong-one",
                                                   "password": "alice-new-pw", "again": "alice-new-pw"})
        assert r.status_code == 400 and "current password is wrong" in r.text
        r = other.post("/account/password", data={"csrf": csrf_of(page), "current": "reset-password",
                                                   "password": "alice-new-pw", "again": "alice-new-pw"},
                       follow_redirects=False)
        assert r.status_code == 303
        assert other.get("/").status_code == 200                          # this session goes on
        assert login(client("127.0.0.6"), "alice", "alice-new-pw").status_code == 303


def test_schemathesis_on_the_labeling_app_finds_no_server_error(tmp_path):
    run = tmp_path / "run"
    from alignloop.feedback import store
    Sess = store.open_db(run)
    add_account(Sess, "root", "root-password", "admin")
    Sess.kw["bind"].dispose()
    with server(run) as base:
        c = httpx.Client(base_url=base, timeout=60)
        assert login(c, "root", "root-password").status_code == 303
        schema = c.get("/openapi.json").json()
        assert "/projects/{pid}" in schema["paths"] and "/tasks/{tid}" in schema["paths"]
        proc = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", base + "/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "10", "--workers", "1", "--phases", "examples,coverage,fuzzing",
             "--request-timeout", "60", "--suppress-health-check", "all", "--seed", "1",
             "-H", f"Cookie: label_session={c.cookies['label_session']}"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    counts = re.search(r"(\d+) generated, (\d+) passed", tail)
    assert counts and int(counts[1]) >= 50 and counts[1] == counts[2], tail
