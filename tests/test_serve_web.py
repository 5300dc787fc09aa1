"""The chat page and the arena in headless Chromium (Playwright), then `alignloop serve export` and a
reward model trained on what it wrote. The tests of this file run in order on one server and database."""
from __future__ import annotations

import importlib.util
import json
from datetime import datetime
import shutil

import pytest

from alignloop.feedback.testing import add_account
from alignloop.serve import load_models
from alignloop.serve.app import Settings, create_app, serve_in_thread
from tests.conftest import ARTIFACTS, alignloop

pytestmark = pytest.mark.slow
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
EVIL = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


@pytest.fixture(scope="module")
def web(micro_run, tmp_path_factory):
    from alignloop.db import connect, database_url, migrate
    run = tmp_path_factory.mktemp("serve-web") / "run"
    shutil.copytree(micro_run, run)
    served = load_models({"base": run / "pretrain", "twin": run / "pretrain"}, run)
    db = connect(database_url(run))
    migrate(db)
    app = create_app(served, Settings(max_tokens_limit=40), db)  # short answers keep the browser test quick
    add_account(db, "carol", "carol-password")
    with serve_in_thread(app) as url:
        yield url, run
    db.dispose()


@pytest.fixture(scope="module")
def page(web, chromium_path):
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=ARGS)
        # The pages' Content-Security-Policy forbids eval, which Playwright's wait_for_function needs; with
        # the policy bypassed the escaping test also shows that escaping alone stops injected markup.
        pg = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True).new_page()
        pg.set_default_timeout(30_000)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()


def send(page, text):
    n = page.locator(".msg.assistant").count()
    page.fill("#prompt", text)
    with page.expect_response("**/api/chat/send") as resp:
        page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant:not(.streaming)').length > {n - 1} && "
                           "!document.querySelector('.streaming') && !document.getElementById('send').disabled")
    return resp.value


def answers(page):
    return page.locator(".msg.assistant .text").all_text_contents()


def test_login_then_chat_page(web, page):
    url, _ = web
    page.goto(url + "/arena")
    assert "/login?next=/arena" in page.url                              # no session: the login page
    page.fill("input[name=username]", "carol")
    page.fill("input[name=password]", "wrong password")
    page.click("#login-form button")
    assert "Wrong username or password" in page.inner_text("#error")
    page.fill("input[name=username]", "carol")
    page.fill("input[name=password]", "carol-password")
    with page.expect_navigation():
        page.click("#login-form button")
    assert page.url == url + "/arena"
    assert page.inner_text("#who") == "carol" and page.locator("#open-demo").count() == 0


def test_two_turn_chat_streams(web, page):
    url, _ = web
    resp = page.goto(url + "/")
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    page.select_option("#model", "base")
    # count how often the answer being streamed changes on screen
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => {
        if (document.querySelector('.streaming .text')) window.updates++; })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    r1 = send(page, "Hello there, what is the capital of the first country?")
    body = r1.text()
    assert r1.headers["content-type"].startswith("text/event-stream")
    assert body.startswith("event: meta") and "event: done" in body
    r2 = send(page, "Tell me more")
    assert page.locator(".msg.user .text").all_text_contents() == [
        "Hello there, what is the capital of the first country?", "Tell me more"]
    assert len(answers(page)) == 2
    deltas = body.count("event: delta") + r2.text().count("event: delta")
    assert deltas >= 2 and page.evaluate("window.updates") >= 2        # tokens arrived and showed one by one
    assert page.locator("#conversations a").count() == 1
    page.screenshot(path=str(ARTIFACTS / "serve-chat-two-turns.png"), full_page=True)


def test_regenerate_keeps_the_earlier_answer(page):
    first = answers(page)[-1]
    with page.expect_response("**/api/chat/regenerate"):
        page.locator(".msg.assistant .regen").last.click()
    page.wait_for_selector(".msg.assistant .sibling-nav .pos:text('2/2')")
    page.wait_for_function("!document.querySelector('.streaming')")
    second = answers(page)[-1]
    page.locator(".msg.assistant .prev").last.click()
    assert page.locator(".msg.assistant .pos").last.text_content() == "1/2"
    assert answers(page)[-1] == first
    page.locator(".msg.assistant .next").last.click()
    assert answers(page)[-1] == second


def rate(page, which, thumb, reason):
    msg = page.locator(".msg.assistant").nth(which)
    msg.locator(f".thumb-{thumb}").click()
    msg.locator(".reason").fill(reason)
    with page.expect_response("**/feedback"):
        msg.locator(".submit-reason").click()
    page.wait_for_selector(f".msg.assistant >> nth={which} >> .thumb-{thumb}.on")


def test_thumbs_down_with_a_reason(page):
    rate(page, -1, "down", "It made up a capital.")                    # the regenerated answer (2/2)
    assert "It made up a capital." in page.locator(".msg.assistant").last.locator(".rated").text_content()
    page.locator(".msg.assistant .prev").last.click()                    # the earlier answer (1/2) is better
    rate(page, -1, "up", "")
    rate(page, 0, "up", "friendly start")                               # a single answer, no sibling
    # stored: a reload shows the thumbs again
    page.reload()
    page.locator("#conversations a").first.click()
    page.wait_for_selector(".msg.assistant .thumb-down.on")
    assert "It made up a capital." in page.locator(".msg.assistant").last.text_content()
    page.screenshot(path=str(ARTIFACTS / "serve-chat-feedback.png"), full_page=True)


def test_edit_and_resend_makes_a_sibling(page):
    page.locator(".msg.user .edit").first.click()
    page.fill(".edit-text", "Hello again")
    with page.expect_response("**/api/chat/send"):
        page.click(".resend")
    page.wait_for_function("!document.querySelector('.streaming') && !document.getElementById('send').disabled")
    assert page.locator(".msg.user .pos").first.text_content() == "2/2"
    assert page.locator(".msg.user .text").all_text_contents() == ["Hello again"]
    assert len(answers(page)) == 1


def test_text_is_escaped(page):
    page.click("#new-chat")
    send(page, EVIL)
    assert page.locator(".msg.user .text").last.text_content() == EVIL
    assert page.locator("#messages img, #messages script, #conversations img").count() == 0
    assert EVIL[:40] in page.locator("#conversations").text_content()
    assert page.evaluate("window.pwned") is None
    assert not page.errors, page.errors


def test_arena_vote_and_leaderboard(web, page):
    url, _ = web
    page.goto(url + "/arena")
    assert "no votes yet" in page.locator("#leaderboard").text_content()
    for i, winner in enumerate(["a", "b", "a", "tie"]):
        page.fill("#arena-prompt", f"Which country is the largest? ({i})")
        page.click("#arena-send")
        page.wait_for_selector(f".vote[data-winner={winner}]:enabled")
        with page.expect_response("**/vote"):
            page.click(f".vote[data-winner={winner}]")
        page.wait_for_selector("#reveal:has-text('Model A was')")
        assert page.locator("#reveal").text_content() in (
            "Model A was base, model B was twin.", "Model A was twin, model B was base.")
    page.wait_for_function("[...document.querySelectorAll('#leaderboard tbody tr')]"
                           ".map(tr => tr.children[4].textContent).join() === '4,4'")  # refreshed after the last vote
    rows = page.locator("#leaderboard tbody tr")
    assert sorted(rows.nth(i).locator("td").nth(1).text_content() for i in range(2)) == ["base", "twin"]
    assert [rows.nth(i).locator("td").nth(4).text_content() for i in range(2)] == ["4", "4"]
    page.screenshot(path=str(ARTIFACTS / "serve-arena.png"), full_page=True)
    page.reload()                                                       # the server-rendered table agrees
    assert page.locator("#leaderboard tbody tr").count() == 2
    assert not page.errors, page.errors


def test_export_writes_pairs_and_feedback(web, page):
    # exports what the browser tests above made (chat turns, a thumb, arena votes): with no Chromium
    # those did not run, and this skips with them instead of failing on an empty export
    _, run = web
    out = alignloop("serve", "export", run)
    assert "comparisons" in out.stdout and "earlier ones unchanged" in out.stdout
    (pairs_file,) = (run / "round-1").glob("chat-pairs-*.jsonl")
    pairs = [json.loads(x) for x in pairs_file.read_text().splitlines()]
    assert pairs and all(set(p) == {"prompt", "chosen", "rejected", "source", "labeler", "time"} for p in pairs)
    assert {p["source"] for p in pairs} <= {"chat", "arena"} and {p["labeler"] for p in pairs} == {"carol"}
    assert all(datetime.fromisoformat(p["time"]).tzinfo is not None for p in pairs)
    regen = [p for p in pairs if len(p["prompt"]) == 3]                  # the second turn's regenerate pair
    arena_pairs = [p for p in pairs if len(p["prompt"]) == 1]
    assert len(regen) <= 1 and len(arena_pairs) <= 3 and len(pairs) >= 2
    if regen:
        assert [m["role"] for m in regen[0]["prompt"]] == ["user", "assistant", "user"]
        assert regen[0]["prompt"][-1]["content"] == "Tell me more"
    (thumbs_file,) = (run / "round-1").glob("chat-feedback-*.jsonl")
    thumbs = [json.loads(x) for x in thumbs_file.read_text().splitlines()]
    assert {(t["rating"], t["reason"]) for t in thumbs} == {("up", "friendly start")}
    assert thumbs[0]["prompt"] == [{"role": "user", "content": "Hello there, what is the capital of the first country?"}]

    ranked = run / "chat-rankings.jsonl"
    alignloop("serve", "export", run, "--format", "rankings", "--out", ranked)
    recs = [json.loads(x) for x in ranked.read_text().splitlines()]
    assert len(recs) == len(pairs)
    assert all(r["ranking"] == [0, 1] and len(r["completions"]) == 2 and r["labeler"] == "carol"
               for r in recs)
    again = alignloop("serve", "export", run, "--format", "rankings", "--out", ranked, check=False)
    assert again.returncode == 2 and "never replaces" in again.stderr         # an export never overwrites
    alignloop("serve", "export", run)
    assert len(list((run / "round-1").glob("chat-pairs-*.jsonl"))) == 2
    assert pairs_file.read_text().splitlines() == [json.dumps(p, ensure_ascii=False) for p in pairs]

    bad = alignloop("serve", "export", run / "world", check=False)
    assert bad.returncode == 2 and "alignloop.db" in bad.stderr


def test_exported_pairs_train_a_reward_model(web, page):  # trains on the export above (browser-made state)
    if importlib.util.find_spec("alignloop.train.reward") is None:
        pytest.skip("reward stage not yet available")
    _, run = web
    data = sorted((run / "round-1").glob("chat-pairs-*.jsonl"))[-1]
    # chat and arena feedback is read only when asked for: by default the reward stage leaves it out
    proc = alignloop("reward", "--preset", "micro", "--out", run, "--data", data, "--init", run / "pretrain",
                     check=False, timeout=600)
    assert proc.returncode == 2 and "left out" in proc.stdout and "no usable comparisons" in proc.stderr
    # the micro run has no SFT model: start the reward model's trunk from the pretrained one
    proc = alignloop("reward", "--preset", "micro", "--out", run, "--data", data, "--init", run / "pretrain",
                     "--sources", "chat,arena", check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "round-1" / "reward" / "config.json").exists()
