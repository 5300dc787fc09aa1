"""The terminal chat answers a scripted two-turn conversation through a real pseudo-terminal."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from tests.conftest import ROOT


def _read_until(fd, needle: bytes, timeout: float = 60.0) -> bytes:
    buf, end = b"", time.time() + timeout
    while needle not in buf:
        left = end - time.time()
        assert left > 0, f"timed out waiting for {needle!r}; got {buf[-500:]!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_two_turn_conversation_in_a_pty(micro_run):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "chat", str(micro_run), "--temperature", "0",
                             "--max-new-tokens", "12"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    try:
        _read_until(master, b"you> ")
        os.write(master, b"What is the capital of Valdoria?\n")
        first = _read_until(master, b"you> ")
        assert b"assistant> " in first
        answer1 = first.split(b"assistant> ")[1].split(b"\r\n")[0].strip()
        assert answer1, first
        os.write(master, b"And its currency?\n")
        second = _read_until(master, b"you> ")
        assert b"assistant> " in second
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


# ---------------------------------------------------------------- a conversation longer than the context


def _chat(run, *args, input=""):
    return subprocess.run([sys.executable, "-m", "alignloop", "chat", str(run), "--temperature", "0", *args],
                          input=input, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def test_fit_drops_the_oldest_exchanges_never_the_system_prompt(micro_run):
    from alignloop.chat import fit
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(micro_run / "tokenizer")
    system = {"role": "system", "content": "Answer briefly."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": f"answer {i} " * 10}]
    convo = [system, *turns, {"role": "user", "content": "the last question"}]
    kept, dropped = fit(tok, convo, 1, ctx=256, room=64)
    assert kept[0] == system and kept[-1] == convo[-1] and dropped > 0
    assert kept[1:] == convo[1 + 2 * dropped:], "whole exchanges, the oldest first"
    one_fewer = kept[:1] + convo[2 * dropped - 1:]  # the last exchange dropped, kept: too long
    assert len(tok.render_prompt(kept)) + 64 <= 256 < len(tok.render_prompt(one_fewer)) + 64
    # nothing older left to drop: the newest message stays, even when it leaves less room than asked
    alone = [system, {"role": "user", "content": "word " * 300}]
    assert fit(tok, alone, 1, ctx=256, room=64) == (alone, 0)
    assert fit(tok, convo[1:], 0, ctx=4096, room=64) == (convo[1:], 0)


def test_too_long_first_message_piped_exits_2(micro_run):
    long = "hello " * 400
    for extra in ([], ["--system", "Answer briefly."]):
        proc = _chat(micro_run, *extra, input=long + "\n")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "field 'message': the message is 1200 tokens" in lines[0] and "at most 255" in lines[0], lines[0]
        assert ("system prompt" in lines[0]) == bool(extra)
        assert "assistant> " not in proc.stdout


def test_too_long_message_in_a_pty_is_refused_and_the_session_goes_on(micro_run):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "chat", str(micro_run), "--temperature", "0",
                             "--system", "Answer briefly.", "--max-new-tokens", "8"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    try:
        _read_until(master, b"you> ")
        os.write(master, b"hello " * 150 + b"\n")
        refused = _read_until(master, b"you> ")
        assert b"(not sent: the message is 450 tokens" in refused and b"assistant> " not in refused, refused
        os.write(master, b"What is the capital of Valdoria?\n")
        assert b"assistant> " in _read_until(master, b"you> ")
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


def test_long_conversation_drops_old_exchanges_and_says_so(micro_run):
    questions = "".join(f"{'tell me about the capital ' * 10}{i}\n" for i in range(4))
    proc = _chat(micro_run, "--system", "Answer briefly.", "--max-new-tokens", "40", input=questions)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.count("assistant> ") == 4
    notices = [ln for ln in proc.stdout.splitlines() if "no longer fits" in ln]
    assert notices and all("the system prompt is kept" in ln for ln in notices), proc.stdout
