"""`alignloop serve` as users run it: the real command in a subprocess, and its bad-input messages."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import ROOT, alignloop, wait_for_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,says", [
    (["/no/such/run"], "no such run, model folder or .gguf file"),
    (["{world}"], "neither a Hugging Face model folder"),
    (["{run}", "--model", "oops"], "expected NAME=PATH"),
    (["--model", "x=/no/such/model"], "no such model folder or .gguf file"),
    (["{run}", "--max-n", "0"], "--max-n"),
    (["{run}", "--temperature", "3"], "--temperature"),
    (["{run}", "--max-queue", "0"], "--max-queue"),
    (["{run}", "--request-timeout", "-1"], "--request-timeout"),
    (["{run}", "--device", "gpu0"], "field 'device': unknown device 'gpu0'"),
    ([], "nothing to serve"),
])
def test_bad_arguments_exit_2(micro_run, args, says, capsys):
    """In this process (the command line's own entry point): one test below goes through a real process."""
    from alignloop import cli
    args = [a.format(run=micro_run, world=micro_run / "world") for a in args]
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err, err


def test_bad_arguments_exit_2_in_a_real_process(micro_run):
    proc = alignloop("serve", micro_run, "--device", "gpu0", check=False, timeout=120)
    assert proc.returncode == 2 and "field 'device': unknown device 'gpu0'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_serve_a_run_directory(micro_copy):
    port = free_port()
    env = {**os.environ, "ALIGNLOOP_QUIET": "1", "ALIGNLOOP_API_KEYS": "secret-1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "serve", str(micro_copy), "--port", str(port),
                             "--max-batch", "8"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(proc, url, 120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret-1", max_retries=0)
        assert [m.id for m in client.models.list()] == ["base"]           # the run's stages, by name
        r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/")                                          # the page needs an account, not a key
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/"
        assert httpx.get(url + "/login").status_code == 200
        assert (micro_copy / "alignloop.db").exists()
    finally:
        proc.terminate()
        proc.wait(30)


def test_queue_flags_reach_the_server(micro_run):
    """`--request-timeout` and `--max-queue` as users pass them: a request that waits longer than the
    time-out without starting (here every one: the batch window of 0.5 s is longer than the time-out of
    0.1 s) is answered 503, which the openai client raises as InternalServerError, with code queue_timeout."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "serve", str(micro_run / "pretrain"), "--port", str(port),
                             "--db", f"sqlite:///{micro_run.parent}/queue-flags.db", "--max-queue", "4",
                             "--request-timeout", "0.1", "--batch-window-ms", "500"],
                            cwd=ROOT, env={**os.environ, "ALIGNLOOP_QUIET": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(proc, url, 120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="pretrain", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_timeout"
        assert "--request-timeout" in e.value.body["message"] and e.value.response.headers["retry-after"]
    finally:
        proc.terminate()
        proc.wait(30)

