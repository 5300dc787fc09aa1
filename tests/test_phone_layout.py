"""The chat page, the arena and report.html on a phone (390×844, touch) and on a laptop (1280×800), in
headless Chromium: nothing wider than the screen at 390 px, the chat's conversation list behind a
"Chats" button with Send in view, the arena's answers stacked. Screenshots of each page at both sizes go
to test-artifacts/screenshots/, or docs/screenshots/ with ALIGNLOOP_UPDATE_SCREENSHOTS=1
(the labeling app's task page: tests/test_label_keyboard.py).

    OMP_NUM_THREADS=1 python -m pytest tests/test_phone_layout.py -q
"""
from __future__ import annotations

import os

import json
import shutil

import pytest

from alignloop.feedback.testing import add_account
from alignloop.report import write_report
from alignloop.serve import load_models
from alignloop.serve.app import Settings, create_app, serve_in_thread
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
# Screenshots go to test-artifacts/ on every run; to docs/screenshots/ (committed) only when asked with
# ALIGNLOOP_UPDATE_SCREENSHOTS=1, so running the tests leaves the work tree as it was.
SHOTS = ROOT / ("docs/screenshots" if os.environ.get("ALIGNLOOP_UPDATE_SCREENSHOTS") == "1" else "test-artifacts/screenshots")
SIZES = {"1280x800": dict(viewport={"width": 1280, "height": 800}),
         "390x844": dict(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2)}


def fits(page) -> bool:
    """No horizontal overflow: the document is no wider than the screen (a page without a viewport tag
    would be laid out 980 px wide on a phone and shrunk: that fails here too)."""
    return page.evaluate("() => document.documentElement.scrollWidth") <= page.viewport_size["width"]


def in_view(page, selector) -> bool:
    b = page.locator(selector).bounding_box()
    size = page.viewport_size
    return b is not None and b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["width"] <= size["width"] \
        and b["y"] + b["height"] <= size["height"]


def fake_eval(run):
    """Two evaluated stages with long prompts and answers: the report's widest tables."""
    stages = {}
    for name in ("base", "sft"):
        ex = [{"id": f"t-{i}", "category": "task", "prompt": f"Question {i} " + "with many words " * 20,
               "answer": f"{name} answer {i} " + "Averylongwordwithoutspaces" * 8, "gold_score": 0.5} for i in range(4)]
        stages[name] = {"gold_score": 0.5, "helpful": 0.1, "truthful": 0.2, "harmless": 0.9, "n_prompts": 4,
                        "ci95": {"gold_score": [0.4, 0.6]}, "rm_score": None, "kl_exact": 1.5, "distinct_2": 0.8,
                        "categories": {"task": {"gold_score": 0.5, "helpful": 0.1, "truthful": 0.2, "harmless": 0.9,
                                                "n_prompts": 4}}, "examples": ex}
    (run / "eval.json").write_text(json.dumps({"stages": stages, "reward_model": {},
                                               "fact_recall": {"base": 0.25, "n_facts": 60}}))


def test_chat_arena_and_report_fit_a_phone(micro_run, tmp_path, chromium_path):
    from alignloop.db import connect, database_url, migrate
    from playwright.sync_api import sync_playwright
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    fake_eval(run)
    report = write_report(run)
    # a run's names: the newest policy is `ppo`, the alias of round-1/ppo (here copies of the base model)
    for sub in ("sft", "round-1/ppo"):
        shutil.copytree(run / "pretrain", run / sub)
    served = load_models({"base": run / "pretrain", "sft": run / "sft", "round-1/ppo": run / "round-1" / "ppo",
                          "ppo": run / "round-1" / "ppo"}, run)
    db = connect(database_url(run))
    migrate(db)
    add_account(db, "carol", "carol-password")
    SHOTS.mkdir(parents=True, exist_ok=True)
    app = create_app(served, Settings(max_tokens_limit=12), db)
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=ARGS)
        for size, opts in SIZES.items():
            phone = size == "390x844"
            page = browser.new_context(**opts).new_page()
            page.set_default_timeout(30_000)
            page.goto(url + "/login")
            page.fill("input[name=username]", "carol")
            page.fill("input[name=password]", "carol-password")
            with page.expect_navigation():
                page.click("#login-form button")

            page.goto(url + "/")
            assert fits(page), size
            assert page.input_value("#model") == "round-1/ppo"          # the chat opens on the newest policy
            assert in_view(page, "#send") and in_view(page, "#prompt"), size   # Send without scrolling
            page.fill("#prompt", "Hello there")
            with page.expect_response("**/api/chat/send"):
                page.locator("#send").click()
            page.wait_for_selector(".msg.assistant:not(.streaming)")
            assert fits(page) and in_view(page, "#send"), size
            if phone:  # the list is a panel: closed, then opened by "Chats", closed again by picking a chat
                assert page.is_hidden("#conversations") and page.is_visible("#toggle-sidebar")
                page.locator("#toggle-sidebar").tap()
                page.wait_for_selector("#conversations a")
                assert page.is_visible("#conversations a") and fits(page)
                page.screenshot(path=str(SHOTS / f"chat-sidebar-{size}.png"))
                page.locator("#conversations a").first.tap()
                page.wait_for_selector("#conversations", state="hidden")
            else:
                assert page.is_visible("#conversations a") and page.is_hidden("#toggle-sidebar")
            page.screenshot(path=str(SHOTS / f"chat-{size}.png"))

            page.goto(url + "/arena")
            assert fits(page), size
            # every served model is listed (the `ppo` alias once, as round-1/ppo); no interval without votes
            assert sorted(page.locator("#leaderboard tbody td:nth-child(2)").all_text_contents()) == [
                "base", "round-1/ppo", "sft"]
            if phone:  # the two answers stacked, not side by side
                a, b = (page.locator(s).bounding_box() for s in ("#answer-a", "#answer-b"))
                assert b["y"] >= a["y"] + a["height"]
            page.screenshot(path=str(SHOTS / f"arena-{size}.png"))

            page.goto(report.as_uri())
            assert fits(page), size
            page.screenshot(path=str(SHOTS / f"report-{size}.png"))
        browser.close()
    db.dispose()
