"""Every stage command is guarded: it refuses (exit 2, nothing written) to write over a stage made with
another configuration or one later stages were built on, unless --force (which moves the old output
aside); it resumes by default after Ctrl-C; `alignloop loop` runs rounds only."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, alignloop

pytestmark = pytest.mark.slow


def snapshot(run: Path) -> dict[str, str]:
    """Every file of the run by path → SHA-256 (and every folder), to show that no byte changed."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def finished(micro_run, tmp_path_factory):
    """A micro run with SFT and a first round's samples, rankings and reward model."""
    import shutil
    run = tmp_path_factory.mktemp("guard") / "run"
    shutil.copytree(micro_run, run)
    for stage in ("sft", "sample", "rank", "reward"):
        alignloop(stage, "--preset", "micro", "--out", run)
    return run


def test_a_stage_under_later_stages_is_refused_and_no_byte_changes(finished):
    before = snapshot(finished)
    proc = alignloop("sft", "--preset", "micro", "--out", finished, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "later stages were built on it" in proc.stderr and "--force" in proc.stderr
    assert snapshot(finished) == before
    # a pretrain under SFT, a sample under its rankings: the same
    for stage in ("pretrain", "sample"):
        proc = alignloop(stage, "--preset", "micro", "--out", finished, check=False)
        assert proc.returncode == 2 and "later stages" in proc.stderr, stage
    assert snapshot(finished) == before


def test_another_configuration_is_refused_and_force_moves_aside(finished, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "round-1")                     # no later stage: only the configuration differs
    before = snapshot(run)
    proc = alignloop("sft", "--preset", "micro", "--out", run, "--epochs", "3", check=False)
    assert proc.returncode == 2 and "epochs = 4 there, 3 now" in proc.stderr, proc.stderr
    assert snapshot(run) == before
    old_model = (run / "sft" / "model.safetensors").read_bytes()
    proc = alignloop("sft", "--preset", "micro", "--out", run, "--epochs", "1", "--force")
    moved = [p for p in run.iterdir() if p.name.startswith("sft.old-")]
    assert len(moved) == 1 and "moved the old sft aside" in proc.stdout
    assert (moved[0] / "model.safetensors").read_bytes() == old_model      # kept, not deleted
    assert (moved[0] / "run-config.toml").exists()
    assert (run / "sft" / "model.safetensors").exists()


def test_ctrl_c_then_the_same_command_resumes(micro_copy):
    cmd = [sys.executable, "-m", "alignloop", "sft", "--preset", "micro", "--out", str(micro_copy),
           "--epochs", "16", "--patience", "0", "--checkpoint-every", "2"]
    env = {**os.environ, "ALIGNLOOP_QUIET": "1"}
    # Ctrl-C as at a terminal, also when the tests themselves run in the background (`cmd &` starts them
    # with SIGINT ignored, which Python and every child would inherit and keep: the run would not stop)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts = micro_copy / "sft" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.exists() and any(ckpts.glob("step-*.pt"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)                    # Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{err}"
    assert "run the same command again to resume" in err
    assert not (micro_copy / "sft" / "model.safetensors").exists()
    step = int(sorted(ckpts.glob("step-*.pt"))[-1].stem[5:])
    assert step >= 2
    # the checkpoint loads without unpickling objects (weights_only=True)
    state = torch.load(sorted(ckpts.glob("step-*.pt"))[-1], map_location="cpu", weights_only=True)
    assert state["step"] == step and "optim" in state
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {ckpts}/step-{step:06d}.pt" in again.stdout
    import json
    steps = [json.loads(x)["step"] for x in (micro_copy / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))      # one uninterrupted log, no step twice
    # --restart starts over, and moves the old folder aside
    proc = alignloop(*cmd[3:], "--restart")
    assert "resuming" not in proc.stdout and any(p.name.startswith("sft.old-") for p in micro_copy.iterdir())


def test_loop_runs_rounds_only(micro_copy, tmp_path):
    # a run with an SFT model but no world (as one built with `sft --init`): refused, nothing made
    run = tmp_path / "own"
    run.mkdir()
    import shutil
    shutil.copytree(micro_copy / "pretrain", run / "sft")
    before = snapshot(run)
    proc = alignloop("loop", "--preset", "micro", "--out", run, check=False)
    assert proc.returncode == 2 and "no world" in proc.stderr, proc.stderr
    assert snapshot(run) == before
    # a run without SFT: `loop` does not train one
    before = snapshot(micro_copy)
    proc = alignloop("loop", "--preset", "micro", "--out", micro_copy, check=False)
    assert proc.returncode == 2 and "no SFT model" in proc.stderr
    assert snapshot(micro_copy) == before


def test_versioned_exports_are_ordered_by_time_then_counter(tmp_path):
    """Two exports in one second get "-2": the newest must still be found (as text "-2" sorts before ".")."""
    from alignloop.rundir import by_version, versioned_path
    made = [versioned_path(tmp_path, "human-rankings") for _ in range(11)]
    (tmp_path / "chat-pairs.jsonl").write_text("")                          # an older run's unversioned file
    order = by_version(list(tmp_path.glob("*.jsonl")))
    assert order[0].name == "chat-pairs.jsonl"
    assert order[1:] == made                                                # -2 … -11 after the first, in order
