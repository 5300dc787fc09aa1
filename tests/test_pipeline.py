"""The main job end to end on `micro`: every stage, eval.json in docs/formats.md's shape, report.html;
running it again resumes (nothing redone); `--labelers human` waits for people's rankings."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.conftest import alignloop

pytestmark = pytest.mark.slow
M_KEYS = {"gold_score", "helpful", "truthful", "harmless", "ci95", "rm_score", "kl_exact", "distinct_2", "n_prompts"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    t = time.perf_counter()
    proc = alignloop("run", "--preset", "micro", "--out", run)
    return run, proc, time.perf_counter() - t


def test_micro_recipe_end_to_end(full_run):
    run, proc, seconds = full_run
    assert seconds < 180, f"the micro pipeline took {seconds:.0f} s"
    data = json.loads((run / "eval.json").read_text())
    assert set(data["stages"]) == {"base", "sft", "round-1/ppo", "round-2/ppo"}
    for name, m in data["stages"].items():
        assert M_KEYS <= set(m), (name, M_KEYS - set(m))
        for k in ("gold_score", "helpful", "truthful", "harmless"):
            lo, hi = m["ci95"][k]
            assert 0 <= lo <= m[k] <= hi <= 1
        assert m["rm_score"] is not None
    assert data["stages"]["round-2/ppo"]["kl_exact"] >= 0
    for rnd in ("round-1", "round-2"):
        assert {"pair_accuracy", "labeler_agreement"} <= set(data["reward_model"][rnd])
    html = (run / "report.html").read_text()
    assert "round-2/ppo" in html and "data:image/png;base64," in html
    assert "report.html" in proc.stdout and "fact recall" in proc.stdout
    # the headroom step after the last round, its table in the final output and the report; each round judged
    assert (run / "headroom.json").is_file() and "where the gain is lost" in proc.stdout
    assert "7. Where the gain is lost" in html and "sampling has no headroom" in html
    assert html.count("no sign of reward hacking") + html.count('class="warn"') == 2
    for sub in ("world", "tokenizer", "pretrain", "sft", "round-1/reward", "round-1/ppo", "round-2/ppo"):
        assert (run / sub).is_dir(), sub
    assert "[world]" in (run / "config.toml").read_text() and "[ppo]" in (run / "config.toml").read_text()


def test_running_again_resumes_without_redoing(full_run, tmp_path):
    run, _, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "round-2" / "ppo" / "model.safetensors").stat().st_mtime
    proc = alignloop("run", "--preset", "micro", "--out", copy)
    assert "round 2: ppo: already done" in proc.stdout
    assert (copy / "round-2" / "ppo" / "model.safetensors").stat().st_mtime == before


def test_resume_with_another_configuration_is_refused(full_run, tmp_path):
    run, _, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = alignloop("run", "--preset", "micro", "--out", copy, "--config", _toml(tmp_path, "[ppo]\nkl_coef = 0.01\n"),
                     check=False)
    assert proc.returncode == 2 and "kl_coef" in proc.stderr


def _toml(tmp_path, text):
    p = tmp_path / "other.toml"
    p.write_text(text)
    return p


def test_human_labelers_stop_after_sampling_then_resume(full_run, tmp_path):
    run, _, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for sub in ("round-1", "round-2", "eval.json", "report.html"):
        p = copy / sub
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    proc = alignloop("run", "--preset", "micro", "--out", copy, "--labelers", "human", "--rounds", "1")
    assert "waits for rankings from people" in proc.stdout
    assert (copy / "round-1" / "samples.jsonl").exists() and not (copy / "round-1" / "reward").exists()
    # people's rankings arrive (here: the simulated labelers' file, in the same format), then the run goes on
    alignloop("rank", "--preset", "micro", "--out", copy)
    proc = alignloop("run", "--preset", "micro", "--out", copy, "--labelers", "human", "--rounds", "1")
    assert (copy / "round-1" / "ppo" / "config.json").exists()
