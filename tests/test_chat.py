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
