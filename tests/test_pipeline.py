"""The main job end to end on `micro`: every stage, eval.json in docs/formats.md's shape, report.html;
running it again resumes (nothing redone); `--labelers human` waits for people's rankings."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import alignloop

pytestmark = pytest.mark.slow
M_KEYS = {"gold_score", "helpful", "truthful", "harmless", "ci95", "rm_score", "kl_exact", "distinct_2", "n_prompts"}


@pytest.fixture(scope="module")
def full_run(micro_recipe):
    """`alignloop run --preset micro` (conftest.py's, made once a session; tests copy it before writing)."""
    return micro_recipe


def test_micro_recipe_end_to_end(full_run):
    run, proc = full_run  # (its wall time is a benchmark's business, not a test's: docs/benchmarks.md)
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


def _metrics(stage_dir):
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_rl_stage_changed_the_policy_and_its_gold(full_run):
    """A PPO stage that saved its starting weights unchanged would pass every check above (eval.json has the
    right keys, the report its sections): each RL stage's weights differ from the stage before it, and so
    do its answers and gold score on the test prompts (eval.json's `stages`: the run scores the test split;
    dev results would sit under `stages_dev`, which the recipe does not write). On the dev prompts, PPO's
    probe (metrics.jsonl: before the first iteration and after the last) shows the answers moved within the
    round, and the next round starts from exactly the policy the previous one ended with."""
    import tomllib

    import torch
    from safetensors.torch import load_file
    run, _ = full_run
    lora = tomllib.loads((run / "config.toml").read_text())["ppo"]["lora_rank"]
    test = json.loads((run / "eval.json").read_text())["stages"]
    chain = ["sft", "round-1/ppo", "round-2/ppo"]
    for prev, cur in zip(chain, chain[1:]):
        a, b = load_file(run / prev / "model.safetensors"), load_file(run / cur / "model.safetensors")
        assert a.keys() == b.keys(), (prev, cur)
        assert all(torch.isfinite(t).all() for t in b.values()), cur
        changed = [k for k in a if not torch.equal(a[k], b[k])]
        assert changed, f"{cur} saved {prev}'s weights unchanged"
        if lora == 0:  # micro fine-tunes every weight
            assert len(changed) == len(a), (cur, sorted(set(a) - set(changed)))
        gold_a = {e["id"]: e["gold_score"] for e in test[prev]["examples"]}
        gold_b = {e["id"]: e["gold_score"] for e in test[cur]["examples"]}
        assert gold_a.keys() == gold_b.keys() and len(gold_b) == test[cur]["n_prompts"]
        moved = sum(gold_a[i] != gold_b[i] for i in gold_a)
        assert moved > 0 and test[cur]["gold_score"] != test[prev]["gold_score"], (cur, "test gold did not move")
        probe = [r for r in _metrics(run / cur) if "gold_probe" in r]
        assert probe[0]["step"] == 0 and probe[-1]["step"] == max(r["step"] for r in _metrics(run / cur)), cur
        assert probe[-1]["rm_probe"] != probe[0]["rm_probe"], (cur, "the dev probe's answers did not move")
    assert test["round-1/ppo"]["kl_exact"] > 0                                 # round 1 left SFT
    first = [r for r in _metrics(run / "round-2" / "ppo") if "gold_probe" in r][0]
    last = [r for r in _metrics(run / "round-1" / "ppo") if "gold_probe" in r][-1]
    # the same dev answers (same seed, same weights): the same gold and distinct-2 (rm_probe is another RM's)
    assert (first["gold_probe"], first["distinct_2_probe"]) == (last["gold_probe"], last["distinct_2_probe"]), \
        "round 2 did not start from the policy round 1 ended with"


def test_running_again_resumes_without_redoing(full_run, tmp_path):
    run, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "round-2" / "ppo" / "model.safetensors").stat().st_mtime
    proc = alignloop("run", "--preset", "micro", "--out", copy)
    assert "round 2: ppo: already done" in proc.stdout
    assert (copy / "round-2" / "ppo" / "model.safetensors").stat().st_mtime == before


def test_resume_with_another_configuration_is_refused(full_run, tmp_path):
    run, _ = full_run
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
    run, _ = full_run
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
