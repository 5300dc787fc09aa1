"""The whole labeling story in a real browser (headless Chromium driven by Playwright) against the real
server (`alignloop label`, uvicorn on 127.0.0.1) and a `micro` model:

admin creates a project, imports prompts, samples answers from the run's model, creates two labelers;
each labeler logs in, ranks with keys and with drag, ties, rates, flags, corrects, critiques, skips,
marks "all bad"; a completion containing <script> shows as text; the admin sees progress and
agreement, marks a gold item and exports; the exported rankings train a reward model.
Screenshots of the ranking page go to test-artifacts/.
"""
from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import ARTIFACTS, alignloop
from sqlalchemy import select

from alignloop.feedback import store
from alignloop.feedback.export import newest_export
from alignloop.feedback.models import Task
from alignloop.feedback.testing import server
from alignloop.io import read_records

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def login(page, base, name, password):
    page.goto(base + "/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")
    page.wait_for_url(base + "/")


def order(page) -> tuple[str, str]:
    return page.input_value("#order"), page.input_value("#ties")


def check_escaping(page) -> bool:
    """On the page that shows the imported <script> answer: it is text, and nothing ran."""
    if "window.__xss" not in page.content():
        return False
    assert page.locator("li.answer .answer-text", has_text="<script>window.__xss=1</script>").count() == 1
    assert page.locator(".conversation .text", has_text="<script>window.__xss=1</script>").count() == 1
    assert page.evaluate("() => window.__xss === undefined")
    page.screenshot(path=str(ARTIFACTS / "label-rank-escaped.png"), full_page=True)
    return True


def test_labeling_story_in_a_real_browser(micro_copy, chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright
    run = micro_copy
    ARTIFACTS.mkdir(exist_ok=True)
    pw = tmp_path / "pw"
    pw.write_text("admin-password\n")
    alignloop("label", "create-admin", run, "--username", "admin", "--password-file", pw)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is the capital of Faralar?"},
        {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
                      {"role": "user", "content": "Reverse the word stone."}]},
        {"prompt": "What is 7 + 5?"},
        {"prompt": "Which answer is safe? " + XSS,
         "completions": [XSS, "A plain answer.", "Another answer.", "A third answer."]}]))

    with server(run) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=ARGS)
        admin = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
        admin.set_default_timeout(30_000)

        # ---- admin: project, prompts, answers from the micro model, two labelers
        login(admin, base, "admin", "admin-password")
        admin.fill("#new-project input[name=name]", "e2e")
        admin.select_option("#new-project select[name=kind]", "ranking")
        admin.fill("#new-project input[name=k]", "4")
        admin.fill("#new-project input[name=overlap]", "2")
        admin.fill("#new-project textarea[name=instructions]", "Rank by helpfulness, truth and harmlessness.")
        admin.click("#new-project button")
        admin.wait_for_url(re.compile(r".*/projects/\d+.*"))
        project_url = admin.url.split("?")[0]
        admin.set_input_files("#import input[type=file]", str(prompts))
        admin.click("#import button")
        assert "Imported 4 items." in admin.inner_text(".message")
        admin.select_option("#sample select[name=model]", "current")
        admin.fill("#sample input[name=max_new_tokens]", "24")
        admin.click("#sample button")
        admin.wait_for_selector('#sampling-status[data-state="done"], #sampling-status[data-state="error"]',
                                timeout=180_000)
        assert admin.get_attribute("#sampling-status", "data-state") == "done", admin.inner_text("#sampling-status")
        admin.goto(project_url)
        assert "4 items, 4 ready to label" in admin.inner_text("#progress")
        admin.goto(base + "/admin/users")
        for name in ("alice", "bob"):
            admin.fill("#new-user input[name=username]", name)
            admin.fill("#new-user input[name=password]", f"{name}-password")
            admin.select_option("#new-user select[name=role]", "labeler")
            admin.click("#new-user button")
            admin.wait_for_url(base + "/admin/users?m=created")
        assert admin.locator("#users td", has_text="alice").count() == 1

        # ---- alice: keys (with a tie), ratings and flags; drag, correction and critique; a skip; all bad
        # tall enough that all four answers are in view: a drag never has to scroll the page
        alice = browser.new_context(viewport={"width": 1200, "height": 2400}).new_page()
        alice.set_default_timeout(30_000)
        login(alice, base, "alice", "alice-password")
        alice.click("#projects a.button")
        alice.wait_for_selector("#rank-form")
        task_ids, escaped = [], False

        escaped |= check_escaping(alice)
        task_ids.append(int(alice.url.rsplit("/", 1)[1]))
        alice.keyboard.press("1")               # pick the answer ranked first …
        alice.keyboard.press("Shift+ArrowDown")  # … and move it down one place
        alice.keyboard.press("4")
        alice.keyboard.press("Shift+ArrowUp")
        alice.keyboard.press("t")                # tie it with the answer above
        assert order(alice) == ("1,0,3,2", "0,3")
        assert alice.inner_text("#ranking li:nth-child(3) .rank") == "= #2"
        for i, sel in enumerate(alice.locator("select.rating").all()):
            sel.select_option(str(1 + i % 7))
        alice.check("input[name=flag_hallucination_0]")
        alice.check("input[name=flag_fails_instruction_3]")
        alice.screenshot(path=str(ARTIFACTS / "label-rank-keys.png"), full_page=True)
        alice.click("#submit")
        alice.wait_for_selector("#rank-form")

        escaped |= check_escaping(alice)
        task_ids.append(int(alice.url.rsplit("/", 1)[1]))
        alice.drag_and_drop("#ranking li:nth-child(4)", "#ranking li:nth-child(1)")
        assert order(alice) == ("3,0,1,2", "")
        alice.click("#ranking li:nth-child(2) .correct-btn")  # copies that answer into the correction box
        original = alice.inner_text("#ranking li:nth-child(2) .answer-text")
        assert alice.input_value("#correction") == original and alice.input_value("#correct_p") == "0"
        alice.fill("#correction", "The capital of Faralar is Vosiskane.")
        alice.fill("#critique", "Answer A invents facts.")
        alice.screenshot(path=str(ARTIFACTS / "label-rank-drag.png"), full_page=True)
        alice.click("#submit")
        alice.wait_for_selector("#rank-form")

        escaped |= check_escaping(alice)
        skipped = int(alice.url.rsplit("/", 1)[1])
        alice.fill("#skip-reason", "I cannot judge this one")
        alice.click("#skip")
        alice.wait_for_selector("#rank-form")

        escaped |= check_escaping(alice)
        task_ids.append(int(alice.url.rsplit("/", 1)[1]))
        alice.check("#all_bad")
        alice.click("#submit")
        alice.wait_for_selector("#no-more")
        assert escaped, "the answer with <script> was never shown to alice"

        # ---- bob ranks everything with keys, the item alice skipped included
        bob = browser.new_context().new_page()
        bob.set_default_timeout(30_000)
        login(bob, base, "bob", "bob-password")
        bob.click("#projects a.button")
        for _ in range(4):
            bob.wait_for_selector("#rank-form")
            bob.keyboard.press("2")
            bob.keyboard.press("Shift+ArrowUp")
            assert order(bob)[0].startswith("1,0")
            bob.click("#submit")
        bob.wait_for_selector("#no-more")
        # blind: bob never saw alice's critique or correction
        assert "invents facts" not in bob.content()

        # ---- admin: progress, agreement, a gold item, export
        admin.goto(project_url)
        assert "7 of 8 answers" in admin.inner_text("#progress")
        rows = admin.inner_text("#labeler-progress")
        assert re.search(r"alice\s+3\s+0\s+1", rows) and re.search(r"bob\s+4\s+0\s+0", rows)
        assert "Between labelers: 3 comparisons" in admin.inner_text("#agreement")
        assert admin.locator("#labeler-agreement td", has_text="alice").count() == 1
        Sess = store.open_db(run)
        with Sess() as db:
            gold_item = db.scalar(select(Task.item_id).where(Task.id == task_ids[0]))
        admin.goto(f"{base}/items/{gold_item}")
        assert "Answer A invents facts." not in admin.inner_text("#labels")  # that was another item
        assert admin.locator("#labels td", has_text="bob").count() == 1
        admin.fill("#gold-ranking", "1 2 3 4")
        admin.click("#gold-form button")
        assert admin.inner_text("#gold") == "1 > 2 > 3 > 4"
        admin.goto(project_url)
        assert "Against gold: 2 answers" in admin.inner_text("#agreement")
        admin.screenshot(path=str(ARTIFACTS / "label-project.png"), full_page=True)
        admin.goto(base + "/")
        plan = admin.inner_text("#export-plan")
        assert "round-1/" in plan and "7 submitted answers" in plan and "never replaced" in plan
        admin.click("#export button")
        done = admin.inner_text("#exported")
        assert "Exported into round 1" in done and "Earlier files are unchanged" in done
        assert re.search(r"7 records in human-rankings-\S+, 1 records in human-demonstrations-\S+, "
                         r"1 records in human-pairs-", done), done
        browser.close()

    # ---- the files are what the loop reads
    with Sess() as db:
        tasks = {t.id: t for t in db.scalars(select(Task).where(Task.id.in_(task_ids)))}
        skipped_task = db.get(Task, skipped)
    Sess.kw["bind"].dispose()
    assert skipped_task.status == "skipped" and skipped_task.skip_reason == "I cannot judge this one"
    recs = [r for _, r in read_records(newest_export(run / "round-1", "rankings"))]
    assert len(recs) == 7 and {r["labeler"] for r in recs} == {"alice", "bob"}
    by_item = {(r["item_id"], r["labeler"]): r for r in recs}
    keys, drag, bad = (by_item[(tasks[t].item_id, "alice")] for t in task_ids)
    s = tasks[task_ids[0]].shown
    assert keys["ranking"] == [s[1], s[0], s[3], s[2]] and keys["ties"] == [sorted([s[0], s[3]])]
    # the rating menus were set in page order, which after the moves shows positions 1, 0, 3, 2
    assert [keys["ratings"][s[p]]["helpful"] for p in (1, 0, 3, 2)] == [1 + (3 * d) % 7 for d in range(4)]
    assert keys["flags"][s[0]]["hallucination"] and keys["flags"][s[3]]["fails_instruction"]
    s = tasks[task_ids[1]].shown
    assert drag["ranking"] == [s[3], s[0], s[1], s[2]] and drag["critique"] == "Answer A invents facts."
    assert drag["correction"] == {"index": s[0], "text": "The capital of Faralar is Vosiskane."}
    assert bad["all_bad"] is True
    (demo,) = [r for _, r in read_records(newest_export(run / "round-1", "demonstrations"))]
    assert demo["messages"][-1] == {"role": "assistant", "content": "The capital of Faralar is Vosiskane."}
    (pair,) = [r for _, r in read_records(newest_export(run / "round-1", "pairs"))]
    assert pair["rejected"] == drag["completions"][s[0]]

    if importlib.util.find_spec("alignloop.train.reward") is None:
        pytest.skip("reward stage not yet available")
    alignloop("reward", "--preset", "micro", "--out", run, "--data", newest_export(run / "round-1", "rankings"),
              "--init", run / "pretrain")
    assert (run / "round-1" / "reward" / "config.json").exists()
