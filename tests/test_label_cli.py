"""`alignloop label create-admin` and `alignloop label export` through the real command line."""
import json
from datetime import datetime

from conftest import alignloop

from alignloop.accounts.users import create_user
from alignloop.feedback import store
from alignloop.feedback.export import newest_export
from alignloop.io import read_records


def test_create_admin(tmp_path):
    run = tmp_path / "run"
    pw = tmp_path / "pw"
    pw.write_text("short\n")
    r = alignloop("label", "create-admin", run, "--username", "root", "--password-file", pw, check=False)
    assert r.returncode == 2 and "at least 8 characters" in r.stderr
    assert not run.exists(), "a failed create-admin leaves no database (nor folder) behind"
    pw.write_text("a good password\n")
    alignloop("label", "create-admin", run, "--username", "root", "--password-file", pw)
    r = alignloop("label", "create-admin", run, "--username", "root", "--password-file", pw, check=False)
    assert r.returncode == 2 and "taken" in r.stderr
    r = alignloop("label", "create-admin", run, "--username", "x", "--password-file", tmp_path / "nope", check=False)
    assert r.returncode == 2 and "password file not found" in r.stderr
    r = alignloop("label", "create-admin", run, "--username", "x", check=False)  # no terminal to ask on
    assert r.returncode == 2 and "--password-file" in r.stderr
    Sess = store.open_db(run)
    with Sess() as db:
        from alignloop.feedback.models import User
        (user,) = db.query(User).all()
    assert user.username == "root" and user.role == "admin" and user.password_hash.startswith("$argon2id$")


def _labeled_run(run):
    """Two labelers rank the same two items (K = 3) straight through the store."""
    Sess = store.open_db(run)
    with Sess.begin() as db:
        ids = {n: create_user(db, n, f"{n}-password", "labeler").id for n in ("alice", "bob")}
        pid = store.create_project(db, "p", "ranking", 3, 2).id
    store.import_items(Sess, pid, [([{"role": "user", "content": f"q{i}"}], [f"a{i}", f"b{i}", f"c{i}"])
                                   for i in range(2)])
    for name, uid in ids.items():
        while (task := store.next_task(Sess, uid, pid)) is not None:
            fields = {"order": "2,1,0", "helpful_0": "1", "truthful_0": "2", "harmless_0": "3",
                      **{f"{c}_{p}": "5" for c in store.CRITERIA for p in (1, 2)}}
            store.submit(Sess, task.id, uid, store.ranking_answer(task.shown, fields))
    Sess.kw["bind"].dispose()


def test_export_into_the_newest_round_with_stable_pseudonyms(tmp_path):
    run = tmp_path / "run"
    r = alignloop("label", "export", run, check=False)
    assert r.returncode == 2 and "no labeling database" in r.stderr
    _labeled_run(run)
    (run / "round-1").mkdir()
    (run / "round-3").mkdir()
    r = alignloop("label", "export", run, "--pseudonymize")
    assert "round 3" in r.stdout and "round-3/human-rankings-" in r.stdout
    recs = [rec for _, rec in read_records(newest_export(run / "round-3", "rankings"))]
    assert len(recs) == 4 and not list((run / "round-1").iterdir())
    for rec in recs:
        assert set(rec) >= {"prompt", "completions", "ranking", "labeler", "flags", "ratings", "item_id", "all_bad",
                            "source", "time"}
        assert rec["source"] == "label" and datetime.fromisoformat(rec["time"]).tzinfo is not None
        assert sorted(rec["ranking"]) == [0, 1, 2] and len(rec["ratings"]) == len(rec["flags"]) == 3
        assert rec["labeler"].startswith("labeler-") and "alice" not in json.dumps(rec)
        assert rec["prompt"][0]["role"] == "user"
    assert len({rec["labeler"] for rec in recs}) == 2
    first_path = newest_export(run / "round-3", "rankings")
    first = first_path.read_text()
    alignloop("label", "export", run, "--pseudonymize", "--round", "3")
    assert first_path.read_text() == first                                  # the older file is untouched
    assert newest_export(run / "round-3", "rankings").read_text() == first  # same names in the new one
    assert len(list((run / "round-3").glob("human-rankings-*.jsonl"))) == 2
    alignloop("label", "export", run, "--round", "2")
    assert {rec["labeler"] for _, rec in read_records(newest_export(run / "round-2", "rankings"))} == {"alice", "bob"}
    assert newest_export(run / "round-2", "demonstrations").read_text() == ""
    assert not list(run.glob("round-*/.*.tmp"))  # atomic writes leave no temporary file behind
    r = alignloop("label", "export", run, "--round", "0", check=False)
    assert r.returncode == 2 and "--round" in r.stderr


def test_label_help_and_missing_run_dir(tmp_path):
    r = alignloop("label", "--help")
    assert "create-admin" in r.stdout and "--db" in r.stdout
    r = alignloop("label", tmp_path / "typo", "--port", "1", check=False)
    assert r.returncode == 2 and "run directory not found" in r.stderr
    r = alignloop("label", tmp_path, "--port", "1", "--device", "gpu0", check=False)
    assert r.returncode == 2 and "field 'device': unknown device 'gpu0'" in r.stderr   # before the server starts
    assert "--dtype" in alignloop("label", "--help").stdout


def test_export_twice_into_a_round_with_rankings_loses_nothing(tmp_path):
    """The round already holds the simulated labelers' files (as after `alignloop run`): exporting the
    people's labels into it twice, from the command line and from the web app, changes none of them."""
    from alignloop.feedback.testing import login, server
    run = tmp_path / "run"
    _labeled_run(run)
    folder = run / "round-1"
    folder.mkdir()
    lines = {"rankings.jsonl": 490, "demonstrations.jsonl": 16, "pairs.jsonl": 16}
    for name, n in lines.items():
        (folder / name).write_text("".join(json.dumps({"n": i, "file": name}) + "\n" for i in range(n)))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    alignloop("label", "export", run)
    Sess = store.open_db(run)
    with Sess.begin() as db:
        create_user(db, "root", "root-password", "admin")
    Sess.kw["bind"].dispose()
    import httpx
    with server(run) as base, httpx.Client(base_url=base, timeout=60) as c:
        assert login(c, "root", "root-password").status_code == 303
        page = c.get("/").text
        assert "round-1/" in page and "4</strong> submitted answers" in page
        import re
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        r = c.post("/export", data={"csrf": csrf})
        assert r.status_code == 200 and "Exported into round 1" in r.text
    for name, data in before.items():
        assert (folder / name).read_bytes() == data, name       # not one byte of the old files changed
    assert {n: len((folder / n).read_text().splitlines()) for n in lines} == lines
    exports = sorted(folder.glob("human-rankings-*.jsonl"))
    assert len(exports) == 2
    assert [len(p.read_text().splitlines()) for p in exports] == [4, 4]
    assert len(list(folder.glob("human-demonstrations-*.jsonl"))) == len(list(folder.glob("human-pairs-*.jsonl"))) == 2
