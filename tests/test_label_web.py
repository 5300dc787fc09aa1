"""The labeling app through HTTP (Starlette's TestClient), each test on a real SQLite file and on a real
PostgreSQL server: access control with second accounts, CSRF, login rate limit, uploads, escaping,
the queue (overlap, skip, exactly-once answers), review and gold, progress and agreement, export."""
from __future__ import annotations

import gzip
import json
import re
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select

from alignloop.accounts.users import create_user
from alignloop.feedback import store
from alignloop.feedback.app import create_app
from alignloop.feedback.export import newest_export
from alignloop.feedback.models import Item, Task, User
from alignloop.feedback.testing import csrf_of, login, postgres_database
from alignloop.io import read_records

PASSWORDS = {"admin": "admin-password", "alice": "alice-password", "bob": "bob-password", "rita": "rita-password"}
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
UPLOAD_CAP = 60_000


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request, tmp_path_factory):
    """(run_dir, database URL or None for the run's SQLite file); one per database for the module."""
    run = tmp_path_factory.mktemp("label-web") / "run"
    run.mkdir()
    if request.param == "sqlite":
        yield run, None
    else:
        with postgres_database(request.getfixturevalue("pg_url")) as url:
            yield run, url


@pytest.fixture(scope="module")
def app(db):
    """One app per database; every test makes its own project (argon2 is slow on purpose: ~0.25 s a hash)."""
    run, url = db
    app = create_app(run, url, max_upload_bytes=UPLOAD_CAP)
    with app.state.Sess.begin() as s:
        for name, role in (("admin", "admin"), ("alice", "labeler"), ("bob", "labeler"), ("rita", "reviewer")):
            create_user(s, name, PASSWORDS[name], role)
    yield app
    app.state.Sess.kw["bind"].dispose()


@pytest.fixture(scope="module")
def users(app) -> dict[str, TestClient]:
    """A logged-in client per account."""
    return {name: client(app, name) for name in PASSWORDS}


def client(app, name: str | None = None, password: str | None = None) -> TestClient:
    c = TestClient(app)
    if name:
        assert login(c, name, password or PASSWORDS[name]).status_code == 303
    return c


def token(c: TestClient, path: str = "/") -> str:
    return csrf_of(c.get(path).text)


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def make_project(admin: TestClient, name=None, kind="ranking", k=3, overlap=2, records=None) -> int:
    t, name = token(admin), name or f"p-{uuid.uuid4().hex[:8]}"
    r = admin.post("/projects", data={"csrf": t, "name": name, "kind": kind, "k": k, "overlap": overlap},
                   follow_redirects=False)
    assert r.status_code == 303, r.text
    pid = int(re.search(r"/projects/(\d+)", r.headers["location"]).group(1))
    if records is None:
        records = [{"prompt": f"question {i}", "completions": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(3)]
    r = admin.post(f"/projects/{pid}/import", data={"csrf": t}, files={"file": ("p.jsonl", jsonl(records))},
                   follow_redirects=False)
    assert r.status_code == 303, r.text
    return pid


def take(c: TestClient, pid: int) -> int | None:
    r = c.get(f"/projects/{pid}/next", follow_redirects=False)
    if r.status_code == 200:
        assert "No more tasks" in r.text
        return None
    assert r.status_code == 303, r.text
    return int(r.headers["location"].rsplit("/", 1)[1])


def rank(c: TestClient, tid: int, **extra):
    page = c.get(f"/tasks/{tid}")
    assert page.status_code == 200, page.text
    k = page.text.count('<li class="answer"')
    data = {"csrf": csrf_of(page.text), "order": ",".join(map(str, range(k))), **extra}
    return c.post(f"/tasks/{tid}", data=data, follow_redirects=False)


def count(app, model, *where) -> int:
    with app.state.Sess() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


# ---------------------------------------------------------------- accounts, roles, access


def test_schema_and_password_hashing(app, db):
    with app.state.Sess() as s:
        tables = set(inspect(s.get_bind()).get_table_names())
        hashes = s.scalars(select(User.password_hash)).all()
    assert {"label_users", "label_sessions", "label_settings", "label_projects", "label_items",
            "label_tasks"} <= tables
    assert all(h.startswith("$argon2id$") for h in hashes)
    assert not any(p in h for h in hashes for p in PASSWORDS.values())
    store.open_db(*db)  # migrating an up-to-date database again is a no-op


def test_session_cookie_is_httponly_and_samesite(app):
    r = login(TestClient(app), "alice", PASSWORDS["alice"])
    c = TestClient(app)
    missing = c.get("/no/such/page")
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
    cookie = r.headers["set-cookie"].lower()
    assert "label_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert "content-security-policy" in r.headers or "content-security-policy" in c.get("/").headers


def test_access_control_by_role_and_owner(app, users):
    admin, alice, bob, rita = (users[n] for n in ("admin", "alice", "bob", "rita"))
    anon = client(app)
    pid = make_project(admin)
    tid = take(alice, pid)
    assert rank(alice, tid, critique="alice's secret critique").status_code == 303
    open_tid = take(alice, pid)  # an open task of alice's
    with app.state.Sess() as s:
        iid = s.get(Task, tid).item_id

    # bob (another labeler) can neither read nor write alice's tasks: they do not exist for him
    bt = token(bob)
    for t in (tid, open_tid):
        assert bob.get(f"/tasks/{t}").status_code == 404
        assert bob.post(f"/tasks/{t}", data={"csrf": bt, "order": "0,1,2"}).status_code == 404
        assert bob.post(f"/tasks/{t}/skip", data={"csrf": bt, "reason": "x"}).status_code == 404
    assert count(app, Task, Task.id == open_tid, Task.status == "assigned") == 1
    # …and never sees her answers, even on items he is given himself
    bob_tid = take(bob, pid)
    assert "alice's secret critique" not in bob.get(f"/tasks/{bob_tid}").text
    assert "alice's secret critique" not in bob.get("/").text

    # labelers: no staff or admin page or action
    for path in (f"/projects/{pid}", f"/items/{iid}", "/admin/users", f"/projects/{pid}/sampling"):
        assert bob.get(path, follow_redirects=False).status_code == 403, path
    for path, data in (("/projects", {"name": "x"}), ("/export", {}), ("/admin/users", {"username": "eve"}),
                       (f"/projects/{pid}/sample", {}), (f"/items/{iid}/resolve", {"ranking": "1 2 3"}),
                       (f"/items/{iid}/gold", {"ranking": "1 2 3"})):
        assert bob.post(path, data={"csrf": bt, **data}, follow_redirects=False).status_code == 403, path
    r = bob.post(f"/projects/{pid}/import", data={"csrf": bt}, files={"file": ("p.jsonl", b'{"prompt": "x"}\n')})
    assert r.status_code == 403

    # the reviewer sees every answer on an item and settles, but is no admin
    page = rita.get(f"/items/{iid}")
    assert page.status_code == 200 and "alice&#39;s secret critique" in page.text
    rt = token(rita)
    assert rita.post(f"/items/{iid}/resolve", data={"csrf": rt, "ranking": "3 2 1"},
                     follow_redirects=False).status_code == 303
    assert rita.post(f"/items/{iid}/gold", data={"csrf": rt, "ranking": "1 2 3"}).status_code == 403
    assert rita.get("/admin/users").status_code == 403
    assert rita.post("/export", data={"csrf": rt}).status_code == 403
    assert rita.get(f"/tasks/{tid}").status_code == 404  # a task page belongs to its labeler only

    # no session: every page sends to the login page, every action is refused
    for path in ("/", f"/projects/{pid}", f"/tasks/{tid}", f"/items/{iid}", "/admin/users"):
        r = anon.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    r = anon.post(f"/tasks/{open_tid}", data={"order": "0,1,2"}, follow_redirects=False)
    assert r.status_code == 303 and count(app, Task, Task.id == open_tid, Task.status == "assigned") == 1

    # an account the admin creates can log in; deactivated, its session stops working at once
    at = token(admin)
    name = f"carol-{uuid.uuid4().hex[:6]}"
    r = admin.post("/admin/users", data={"csrf": at, "username": name, "password": "carol-password",
                                         "role": "labeler"}, follow_redirects=False)
    assert r.status_code == 303
    carol = client(app, name, "carol-password")
    assert carol.get("/", follow_redirects=False).status_code == 200
    with app.state.Sess() as s:
        carol_id = s.scalar(select(User.id).where(User.username == name))
    assert admin.post(f"/admin/users/{carol_id}/active", data={"csrf": at}, follow_redirects=False).status_code == 303
    assert carol.get("/", follow_redirects=False).status_code == 303
    assert login(client(app), name, "carol-password").status_code == 401


def test_csrf_token_required_on_every_post(app, users):
    admin, alice = users["admin"], client(app, "alice")  # alice's own client: she logs out below
    pid = make_project(admin)
    tid = take(alice, pid)
    for c, path, data in ((admin, "/projects", {"name": "evil"}), (admin, "/admin/users",
                          {"username": "eve", "password": "eve-password", "role": "admin"}),
                          (alice, f"/tasks/{tid}", {"order": "0,1,2"}),
                          (alice, f"/tasks/{tid}/skip", {"reason": "x"}), (admin, "/export", {}),
                          (alice, "/logout", {})):
        assert c.post(path, data=data, follow_redirects=False).status_code == 403, path
        assert c.post(path, data={**data, "csrf": "forged"}, follow_redirects=False).status_code == 403, path
    # one person's token is no good in another person's session
    assert alice.post("/projects", data={"name": "evil", "csrf": token(admin)}).status_code == 403
    assert admin.post("/projects", data={"name": "evil", "csrf": token(alice)}).status_code == 403
    r = admin.post(f"/projects/{pid}/import", files={"file": ("p.jsonl", b'{"prompt": "x"}\n')})
    assert r.status_code == 403
    with app.state.Sess() as s:
        assert s.scalar(select(func.count()).select_from(User).where(User.username == "eve")) == 0
        assert s.scalar(select(func.count()).select_from(Item).where(Item.project_id == pid)) == 3
    assert count(app, Task, Task.id == tid, Task.status == "assigned") == 1
    # login itself needs the login page's token (no login CSRF)
    anon = client(app)
    r = anon.post("/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf": "x"},
                  follow_redirects=False)
    assert r.status_code == 403


def test_login_is_rate_limited(app):
    name = f"dave-{uuid.uuid4().hex[:6]}"
    with app.state.Sess.begin() as s:
        create_user(s, name, "dave-password", "labeler")
    c = client(app)
    for _ in range(5):
        assert login(c, name, "wrong-password").status_code == 401
    r = login(c, name, "dave-password")  # even the right password waits now
    assert r.status_code == 429 and "Too many failed logins" in r.text
    assert login(c, "bob", PASSWORDS["bob"]).status_code == 303  # another account is not locked out
    assert login(c, "nobody", "whatever-password").status_code == 401


# ---------------------------------------------------------------- uploads


BAD_UPLOADS = [
    ("p.csv", b"prompt\nhello\n", "unsupported file type"),
    ("p.jsonl", jsonl([{"prompt": "ok"}, {"question": "no prompt"}]), "p.jsonl:2 field 'prompt'"),
    ("p.jsonl", jsonl([{"prompt": "ok"}, {"prompt": "x", "completions": "abc"}]), "p.jsonl:2 field 'completions'"),
    ("p.jsonl", jsonl([{"prompt": "x", "completions": [str(i) for i in range(10)]}]), "2 to 9 answers"),
    ("p.jsonl", jsonl([{"prompt": "x", "completions": ["a", "a"]}]), "the same answer twice"),
    ("p.jsonl", jsonl([{"messages": [{"role": "robot", "content": "hi"}]}]), "messages[0].role"),
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', "p.jsonl:3"),
    ("p.jsonl", b'{"prompt": "caf\xe9"}\n', "not UTF-8"),
    ("p.json", b'{"prompt": "a"', "not valid JSON"),
    ("p.jsonl", b"", "empty"),
    ("big.jsonl", jsonl([{"prompt": "x" * 1000}] * (UPLOAD_CAP // 900)), "too large"),
]


@pytest.mark.parametrize("name, body, expect", BAD_UPLOADS, ids=[
    "format", "missing-field", "wrong-type", "k-too-big", "duplicate-answers", "bad-role", "bad-json-line",
    "not-utf8", "bad-json", "empty", "oversize"])
def test_bad_upload_shows_error_and_imports_nothing(users, app, name, body, expect):
    admin = users["admin"]
    pid = make_project(admin, records=[{"prompt": "already here", "completions": ["a", "b", "c"]}])
    r = admin.post(f"/projects/{pid}/import", data={"csrf": token(admin)}, files={"file": (name, body)})
    assert r.status_code in (400, 413)
    assert 'id="error"' in r.text and "Nothing imported" in r.text or "too large" in r.text
    assert expect in r.text.replace("&#39;", "'"), r.text[:3000]
    assert count(app, Item, Item.project_id == pid) == 1


def test_upload_formats_prompts_messages_imported_answers_parquet_gzip(app, users, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    admin = users["admin"]
    pid = make_project(admin, records=[
        {"prompt": "plain text"},
        {"prompt": [{"role": "user", "content": "as messages"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "(a demonstration's answer is dropped)"}]},
        {"prompt": "ranked elsewhere", "completions": ["x", "y"], "ranking": [1, 0], "labeler": "z"}])
    pq.write_table(pa.Table.from_pylist([{"prompt": "from parquet"}]), tmp_path / "p.parquet")
    t = token(admin)
    for name, body in (("p.parquet", (tmp_path / "p.parquet").read_bytes()),
                       ("p.jsonl.gz", gzip.compress(b'{"prompt": "gzipped"}\n')),
                       ("p.json", json.dumps([{"prompt": "json list"}]).encode())):
        r = admin.post(f"/projects/{pid}/import", data={"csrf": t}, files={"file": (name, body)},
                       follow_redirects=False)
        assert r.status_code == 303, r.text
    with app.state.Sess() as s:
        items = s.scalars(select(Item).where(Item.project_id == pid).order_by(Item.id)).all()
    assert [i.prompt[-1]["content"] for i in items] == ["plain text", "as messages", "and?", "ranked elsewhere",
                                                        "from parquet", "gzipped", "json list"]
    assert len(items[2].prompt) == 4 and items[2].prompt[0]["role"] == "system"
    assert [i.ready for i in items] == [False, False, False, True, False, False, False]  # answers to sample
    assert items[3].completions == ["x", "y"]


def test_import_warns_when_k_is_not_the_projects(app, users):
    admin = users["admin"]
    pid = make_project(admin, k=3, records=[{"prompt": "three", "completions": ["a", "b", "c"]}])
    r = admin.post(f"/projects/{pid}/import", data={"csrf": token(admin)}, files={"file": ("p.jsonl", jsonl([
        {"prompt": "four", "completions": ["a", "b", "c", "d"]}, {"prompt": "three", "completions": ["x", "y", "z"]},
        {"prompt": "no answers yet"}]))})
    assert r.status_code == 200 and "Imported 3 items. Warning: 1 of them do not have this project&#39;s K" in r.text
    r = admin.post(f"/projects/{pid}/import", data={"csrf": token(admin)},
                   files={"file": ("p.jsonl", jsonl([{"prompt": "three", "completions": ["x", "y", "z"]}]))})
    assert "Imported 1 items." in r.text and "Warning" not in r.text


def test_sampling_needs_a_model_and_a_ranking_project(app, users):
    admin = users["admin"]
    pid = make_project(admin, records=[{"prompt": "no answers yet"}])
    r = admin.post(f"/projects/{pid}/sample", data={"csrf": token(admin), "model": "current", "k": 3})
    assert r.status_code == 400 and "no model &#39;current&#39; in this run" in r.text  # this run has none
    r = admin.post(f"/projects/{pid}/sample", data={"csrf": token(admin), "model": "current", "k": 12})
    assert r.status_code == 400 and "field &#39;k&#39;" in r.text
    demo = make_project(admin, kind="demonstration", records=[{"prompt": "write"}])
    r = admin.post(f"/projects/{demo}/sample", data={"csrf": token(admin), "model": "current"})
    assert r.status_code == 400 and "only ranking projects" in r.text
    assert admin.get(f"/projects/{pid}/sampling").json() == {"state": "idle"}
    assert take(users["alice"], pid) is None  # an item without answers is not handed out


# ---------------------------------------------------------------- escaping


def test_untrusted_text_is_escaped_everywhere(app, users):
    admin, alice = users["admin"], users["alice"]
    pid = make_project(admin, overlap=1, records=[{"prompt": XSS, "completions": [XSS, "<b>bold</b>"]}])
    tid = take(alice, pid)
    page = alice.get(f"/tasks/{tid}").text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>window" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert rank(alice, tid, critique=XSS, correct_p="0", correction=XSS + "!").status_code == 303
    with app.state.Sess() as s:
        iid = s.get(Task, tid).item_id
    for path in (f"/items/{iid}", f"/projects/{pid}", "/"):
        html = admin.get(path).text
        assert "<script>window" not in html and "<img src=x" not in html, path
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in admin.get(f"/items/{iid}").text
    # the name of a project is untrusted too
    t = token(admin)
    admin.post("/projects", data={"csrf": t, "name": XSS, "kind": "ranking", "k": 2, "overlap": 1})
    assert "<script>window" not in admin.get("/").text and "<script>window" not in alice.get("/").text


# ---------------------------------------------------------------- the queue and answers


def test_queue_overlap_no_repeats_skip_and_exactly_once(app, users):
    admin, alice, bob, rita = (users[n] for n in ("admin", "alice", "bob", "rita"))
    pid = make_project(admin, overlap=2)  # 3 items × 2 labelers
    first = take(alice, pid)
    assert take(alice, pid) == first  # an open task comes back until it is answered or skipped
    r = alice.post(f"/tasks/{first}/skip", data={"csrf": token(alice), "reason": ""})
    assert r.status_code == 400 and "say why you skip" in r.text
    r = alice.post(f"/tasks/{first}/skip", data={"csrf": token(alice), "reason": "unsure"}, follow_redirects=False)
    assert r.status_code == 303
    seen = []
    while (tid := take(alice, pid)) is not None:
        seen.append(tid)
        assert rank(alice, tid).status_code == 303
    with app.state.Sess() as s:
        skipped_item = s.get(Task, first).item_id
        alice_items = [s.get(Task, t).item_id for t in seen]
    assert len(seen) == 2 and skipped_item not in alice_items  # a skipped item does not come back
    # bob and rita fill the rest; nobody gets more than the overlap allows
    for c in (bob, rita):
        while (tid := take(c, pid)) is not None:
            assert rank(c, tid).status_code == 303
    assert take(admin, pid) is None  # all three items have their two labels
    with app.state.Sess() as s:
        per_item = s.execute(select(Task.item_id, func.count()).where(Task.status == "submitted",
                                                                      Task.project_id == pid)
                             .group_by(Task.item_id)).all()
        items = s.scalars(select(Item).where(Item.project_id == pid)).all()
    assert sorted(n for _, n in per_item) == [2, 2, 2]
    assert all(i.n_assigned == 2 and i.n_done == 2 for i in items)

    # a second submission of the same task is refused and stores nothing
    t = seen[0]
    r = rank(alice, t)
    assert r.status_code in (200, 409)
    r = alice.post(f"/tasks/{t}", data={"csrf": token(alice), "order": "2,1,0"}, follow_redirects=False)
    assert r.status_code == 409
    assert count(app, Task, Task.status == "submitted", Task.project_id == pid) == 6


def test_admin_releases_tasks_left_open(app, users):
    admin, alice, bob = users["admin"], users["alice"], users["bob"]
    pid = make_project(admin, overlap=1, records=[{"prompt": "only", "completions": ["a", "b"]}])
    tid = take(alice, pid)  # alice opens the only task and walks away
    assert take(bob, pid) is None
    r = admin.post(f"/projects/{pid}/release", data={"csrf": token(admin), "hours": "1"}, follow_redirects=False)
    assert r.status_code == 303 and "n=0" in r.headers["location"]  # not open long enough yet
    r = admin.post(f"/projects/{pid}/release", data={"csrf": token(admin), "hours": "0"}, follow_redirects=False)
    assert "n=1" in r.headers["location"]
    assert "Released 1 open tasks." in admin.get(r.headers["location"]).text
    r = alice.post(f"/tasks/{tid}", data={"csrf": token(alice), "order": "0,1"})
    assert r.status_code == 409  # too late: the slot went back to the queue
    assert rank(bob, take(bob, pid)).status_code == 303
    assert take(alice, pid) is None
    r = admin.post(f"/projects/{pid}/release", data={"csrf": token(admin), "hours": "x"})
    assert r.status_code == 400
    assert bob.post(f"/projects/{pid}/release", data={"csrf": token(bob), "hours": "0"}).status_code == 403


def test_bad_answers_are_refused_with_the_reason(app, users):
    admin, alice = users["admin"], users["alice"]
    pid = make_project(admin, overlap=1)
    tid = take(alice, pid)
    t = token(alice, f"/tasks/{tid}")
    for data, msg in (({"order": "0,1"}, "each of the 3 answers once"),
                      ({"order": "0,1,2", "helpful_0": "9"}, "from 1 to 7"),
                      ({"order": "0,1,2", "correct_p": "1"}, "write the corrected answer")):
        r = alice.post(f"/tasks/{tid}", data={"csrf": t, **data})
        assert r.status_code == 400 and msg in r.text and 'id="rank-form"' in r.text
    assert count(app, Task, Task.status == "submitted", Task.project_id == pid) == 0


def test_review_gold_progress_and_agreement(app, users):
    admin, alice, bob = users["admin"], users["alice"], users["bob"]
    pid = make_project(admin, overlap=2)
    for c in (alice, bob):
        while (tid := take(c, pid)) is not None:
            page = c.get(f"/tasks/{tid}").text
            # both rank the answers in their original order (a > b > c): full agreement
            order = [m for m in re.findall(r'<div class="text answer-text">(\w)\d</div>', page)]
            pos = sorted(range(3), key=lambda p: "abc".index(order[p]))
            r = c.post(f"/tasks/{tid}", data={"csrf": csrf_of(page), "order": ",".join(map(str, pos))},
                       follow_redirects=False)
            assert r.status_code == 303
    with app.state.Sess() as s:
        iid = s.scalar(select(Item.id).where(Item.project_id == pid).order_by(Item.id))
    at = token(admin)
    assert admin.post(f"/items/{iid}/gold", data={"csrf": at, "ranking": "3 2 1"},
                      follow_redirects=False).status_code == 303
    r = admin.post(f"/items/{iid}/gold", data={"csrf": at, "ranking": "1 1 2"})
    assert r.status_code == 400 and "name each of the answers" in r.text
    page = admin.get(f"/projects/{pid}").text
    assert "3 items, 3 ready to label, 3 complete" in page and "6 of 6 answers (100.0%)" in page
    assert "pairwise agreement 100%, Kendall's τ 1.00" in page
    assert "Against gold: 2 answers, agreement 0%, τ -1.00" in page
    assert re.search(r"<td>alice</td><td>3</td><td>100%</td><td>1.00</td><td>1</td><td>0%</td><td>-1.00</td>", page)
    assert "3 &gt; 2 &gt; 1" in admin.get(f"/items/{iid}").text
    assert "No disagreements." in admin.get(f"/projects/{pid}?disagreements=1").text


def test_reviewer_finds_and_settles_disagreements(app, users, db):
    run, _ = db
    admin, alice, bob, rita = (users[n] for n in ("admin", "alice", "bob", "rita"))
    name = f"disagree-{uuid.uuid4().hex[:6]}"
    pid = make_project(admin, name=name, overlap=2, records=[
        {"prompt": "agreed", "completions": ["x1", "y1"]}, {"prompt": "disputed", "completions": ["x2", "y2"]}])
    for c, flip in ((alice, False), (bob, True)):
        while (tid := take(c, pid)) is not None:
            page = c.get(f"/tasks/{tid}").text
            texts = re.findall(r'<div class="text answer-text">(\w\d)</div>', page)
            best_first = sorted(range(2), key=lambda p: texts[p][0] == ("x" if flip and texts[p][1] == "2" else "y"))
            r = c.post(f"/tasks/{tid}", data={"csrf": csrf_of(page), "order": ",".join(map(str, best_first))},
                       follow_redirects=False)
            assert r.status_code == 303
    page = rita.get(f"/projects/{pid}?disagreements=1").text
    assert "disputed" in page and "agreed" not in page.split('id="items"')[1] and "<td>0%</td>" in page
    iid = int(re.search(r'<a href="/items/(\d+)">Review</a>', page).group(1))
    item = rita.get(f"/items/{iid}").text
    assert "alice" in item and "bob" in item and "ranking: 1 &gt; 2" in item and "ranking: 2 &gt; 1" in item
    r = rita.post(f"/items/{iid}/resolve", data={"csrf": csrf_of(item), "ranking": "2 1"}, follow_redirects=False)
    assert r.status_code == 303
    assert "2 &gt; 1 (by rita)" in rita.get(f"/items/{iid}").text
    admin.post("/export", data={"csrf": token(admin), "project": name, "round": "5"})
    recs = [rec for _, rec in read_records(newest_export(run / "round-5", "rankings"))]
    (review,) = [rec for rec in recs if rec.get("review")]
    assert len(recs) == 5 and review["labeler"] == "rita" and review["ranking"] == [1, 0]


def test_demonstration_project_and_export(app, users, db):
    run, _ = db
    admin, alice = users["admin"], users["alice"]
    demo_name, rank_name = f"demos-{uuid.uuid4().hex[:6]}", f"ranks-{uuid.uuid4().hex[:6]}"
    pid = make_project(admin, name=demo_name, kind="demonstration", overlap=1, records=[
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "what is 2+2?"}]}])
    tid = take(alice, pid)
    page = alice.get(f"/tasks/{tid}").text
    assert "what is 2+2?" in page and "hello" in page  # the multi-turn context is shown
    r = alice.post(f"/tasks/{tid}", data={"csrf": csrf_of(page), "answer": "  "})
    assert r.status_code == 400
    r = alice.post(f"/tasks/{tid}", data={"csrf": csrf_of(page), "answer": "4."}, follow_redirects=False)
    assert r.status_code == 303
    rp = make_project(admin, name=rank_name, overlap=1)
    tid = take(alice, rp)
    assert rank(alice, tid, correct_p="0", correction="a fixed answer", critique="meh").status_code == 303

    newest = max([int(p.name[6:]) for p in run.glob("round-*")], default=0) + 1
    (run / f"round-{newest}").mkdir()  # the export button writes into the newest round by default
    r = admin.post("/export", data={"csrf": token(admin), "project": demo_name})
    assert r.status_code == 200 and f"Exported into round {newest}" in r.text
    assert re.search(r"0 records in human-rankings-\S+\.jsonl, 1 records in human-demonstrations-", r.text)
    (d,) = [rec for _, rec in read_records(newest_export(run / f"round-{newest}", "demonstrations"))]
    assert d["messages"][-1] == {"role": "assistant", "content": "4."} and len(d["messages"]) == 4
    assert d["labeler"] == "alice" and d["kind"] == "demonstration" and d["source"] == "label"

    later = newest + 1
    r = admin.post("/export", data={"csrf": token(admin), "project": rank_name, "round": str(later),
                                    "pseudonymize": "on"})
    assert r.status_code == 200 and f"round-{later}" in r.text
    (c,) = [rec for _, rec in read_records(newest_export(run / f"round-{later}", "demonstrations"))]
    assert c["kind"] == "correction" and c["messages"][-1]["content"] == "a fixed answer"
    (pair,) = [rec for _, rec in read_records(newest_export(run / f"round-{later}", "pairs"))]
    (ranking,) = [rec for _, rec in read_records(newest_export(run / f"round-{later}", "rankings"))]
    assert pair["source"] == ranking["source"] == "label" and pair["time"] and ranking["time"]
    assert pair["chosen"] == "a fixed answer" and pair["prompt"] == ranking["prompt"] == c["messages"][:-1]
    assert ranking["labeler"] == c["labeler"] == pair["labeler"] and ranking["labeler"].startswith("labeler-")
    n = ranking["prompt"][0]["content"].split()[-1]  # the item alice was given ("question n")
    assert sorted(ranking["ranking"]) == [0, 1, 2] and ranking["completions"] == [f"a{n}", f"b{n}", f"c{n}"]
    assert ranking["critique"] == "meh" and ranking["correction"]["text"] == "a fixed answer"
    assert ranking["completions"][ranking["correction"]["index"]] == pair["rejected"]
    r = admin.post("/export", data={"csrf": token(admin), "round": "0"})
    assert r.status_code == 400 and "round" in r.text
