"""Seeds and reproducibility: experiments/seeds.py's table by hand (two seeds); on `micro`, a seed run end to
end into the table gives the figures of conftest.py's run of the same seed to the last bit (the same seed
run twice on this machine), then experiments/bigger.py and experiments/round1.py on that run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from alignloop.stats import mean_sd
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
from round1 import parse_settings  # noqa: E402
from seeds import seeds_table  # noqa: E402


def test_round1_settings_parsed_and_bad_ones_named(tmp_path):
    assert parse_settings("base=;e4=--ppo-epochs 4;rm=--epochs 8 --early-stop 0.1 ->;both=--lr 1e-4 -> --iterations 3") == [
        ("base", None, []), ("e4", None, ["--ppo-epochs", "4"]), ("rm", ["--epochs", "8", "--early-stop", "0.1"], []),
        ("both", ["--lr", "1e-4"], ["--iterations", "3"])]
    for bad in ("a b=", "=--lr 1", "x", "a=;a=--lr 1", "../up="):
        with pytest.raises(ValueError, match="not NAME=FLAGS"):
            parse_settings(bad)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "round1.py"), "--runs", str(tmp_path), "--seeds", "0",
                           "--settings", "base="], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and f"{tmp_path / 'seed-0' / 'world' / 'world.json'} is missing" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def _stage(gold: float, golds: dict[str, float]) -> dict:
    return {"gold_score": gold, "examples": [{"id": k, "gold_score": v} for k, v in golds.items()]}


def test_seeds_table_by_hand():
    assert mean_sd([0.5, 0.4]) == (pytest.approx(0.45), pytest.approx(0.070711, abs=1e-6)) and mean_sd([0.3]) == (0.3, None)
    evals = {  # seed 0: per-prompt gains 0.1, 0 → +0.050, half-width 1.96·0.070711/√2 = 0.098 → [−0.048, +0.148]
        0: {"fact_recall": {"base": 0.9}, "stages": {"base": _stage(0.5, {}), "sft": _stage(0.7, {"a": 0.6, "b": 0.8}),
                                                   "round-1/ppo": _stage(0.75, {"a": 0.7, "b": 0.8})}},
        # seed 1: gains 0.1, 0.12 → +0.110, half-width 1.96·0.014142/√2 = 0.0196 → [+0.090, +0.130]
        1: {"fact_recall": {"base": 0.8}, "stages": {"base": _stage(0.4, {}), "sft": _stage(0.6, {"a": 0.5, "b": 0.5}),
                                                   "round-1/ppo": _stage(0.7, {"a": 0.6, "b": 0.62})}}}
    lines = seeds_table(evals).splitlines()
    assert lines[0] == "| seed | fact recall | base gold | sft gold | round-1/ppo gold | round-1/ppo gain over sft [95%] |"
    assert lines[2] == "| 0 | 90.0% | 0.500 | 0.700 | 0.750 | +0.050 [-0.048, +0.148] |"
    assert lines[3] == "| 1 | 80.0% | 0.400 | 0.600 | 0.700 | +0.110 [+0.090, +0.130] |"
    # across seeds: recall 85.0 ± 7.1 (sd of 90, 80), gains +0.080 ± 0.042 (sd of 0.05, 0.11)
    assert lines[4] == "| mean ± sd (2 seeds) | 85.0 ± 7.1% | 0.450 ± 0.071 | 0.650 ± 0.071 | 0.725 ± 0.035 | +0.080 ± 0.042 |"
    assert lines[5] == "| seeds with the interval above 0 |  |  |  |  | 1 of 2 |"
    # the behaviours, per stage: one rate per seed and their mean; a stage without categories shows "–"
    evals[0]["stages"]["round-1/ppo"]["categories"] = {"harmful": {"helpful": 0.5}, "unknown_fact": {"helpful": 0.25},
                                                       "known_fact": {"helpful": 0.8}}
    evals[1]["stages"]["round-1/ppo"]["categories"] = {"harmful": {"helpful": 0.7}, "unknown_fact": {"helpful": 0.35},
                                                       "known_fact": {"helpful": 0.6}}
    lines = seeds_table(evals).splitlines()
    assert lines[7].startswith("| stage | harmful: declines politely | unknown fact: says it does not know |")
    assert lines[11] == "| round-1/ppo | 0.50 / 0.70 (mean 0.60) | 0.25 / 0.35 (mean 0.30) | 0.80 / 0.60 (mean 0.70) |"
    assert lines[9] == "| base | – | – | – |"


FIGURES = ("gold_score", "helpful", "truthful", "harmless", "ci95", "rm_score", "kl_exact", "distinct_2", "mean_length")


def figures(ev: dict) -> dict:
    """What a run reports: every stage's figures and answers, fact recall, the reward models' accuracies
    (not wall times or throughput, which a busy machine changes)."""
    return {"fact_recall": ev["fact_recall"],
            "stages": {s: {**{k: m[k] for k in FIGURES}, "answers": [e["answer"] for e in m["examples"]]}
                       for s, m in ev["stages"].items()},
            "reward_model": {r: {k: v for k, v in m.items() if "seconds" not in k and not k.endswith("per_s")
                                 and k != "peak_memory_gb"}
                             for r, m in ev["reward_model"].items()}}


def experiment(script, *args, timeout=900):
    """experiments/SCRIPT ARGS in a subprocess with one thread a process, as conftest.py's micro recipe was
    made: a run it repeats must give the same bits."""
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_seed_into_a_table_run_twice_is_identical_then_bigger_and_round1(micro_recipe, tmp_path):
    proc = experiment("seeds.py", "--preset", "micro", "--seeds", "0", "--runs", tmp_path, "--md", tmp_path / "seeds.md")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "seeds.md").read_text()
    assert table.split("\n\n", 1)[1] in proc.stdout
    gains, behaviours = table.split("\n\n")[1:3]  # after the command line: the gains, then the behaviours
    rows = [line for line in gains.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| 0", "| mean ± sd (1 seeds)", "| seeds with the interval above 0"]
    assert [r.split(" | ")[0] for r in behaviours.splitlines()[2:]] == ["| base", "| sft", "| round-1/ppo", "| round-2/ppo"]
    assert "round-2/ppo gain over sft [95%]" in rows[0]
    # the same seed again, on this machine (conftest.py's run, another process): the same figures, to the last bit
    run = tmp_path / "seed-0"
    one = json.loads((run / "eval.json").read_text())
    assert figures(one) == figures(json.loads((micro_recipe[0] / "eval.json").read_text()))
    # InstructGPT's headline in miniature (experiments/bigger.py), on dev with the bigger model's own SFT rate:
    # its SFT fine-tuned from its pretrained model in a folder of its own, every row's figures on dev
    proc = experiment("bigger.py", "--runs", tmp_path, "--seeds", "0", "--size", "tiny", "--preset", "micro",
                      "--sft-lr", "2e-3", "--split", "dev")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    big = json.loads((run / "bigger-tiny-sft-lr0.002" / "eval.json").read_text())
    own = json.loads((run / "eval.json").read_text())
    assert set(big["stages_dev"]) == {"sft"} and not big.get("stages")  # scored on dev only
    assert {"sft", "round-2/ppo"} <= set(own["stages_dev"]) and figures(own) == figures(one)  # test results untouched
    assert (run / "bigger-tiny" / "pretrain" / "config.json").exists() and not (run / "bigger-tiny" / "sft").exists()
    row = (tmp_path / "bigger-tiny.md").read_text().splitlines()[-1]
    cells = row.split(" | ")
    assert cells[0] == "| 0" and cells[1] == "round-2/ppo"
    assert cells[2] == f"{own['stages_dev']['round-2/ppo']['gold_score']:.3f}"
    assert cells[5] == f"{big['stages_dev']['sft']['gold_score']:.3f}"
    # round 1 again with other settings (experiments/round1.py), paired against the run's SFT on dev: with no
    # flags it is the main job's round 1 to the last bit, with the run's reward model or with one trained again
    def round1(settings):
        proc = experiment("round1.py", "--runs", tmp_path, "--seeds", "0", "--preset", "micro", "--settings", settings)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return (tmp_path / "round1.md").read_text().splitlines()

    from safetensors.torch import load_file

    def weights(folder, stage):
        return load_file(folder / "round-1" / stage / "model.safetensors")

    lines = round1("base=;again=->")
    base, again = tmp_path / "seed-0-r1-base", tmp_path / "seed-0-r1-again"
    assert (base / "round-1" / "reward").is_symlink() and not (again / "round-1" / "reward").is_symlink()
    for stage in ("reward", "ppo"):
        main_job = weights(run, stage)
        assert all(torch.equal(main_job[k], weights(again, stage)[k]) for k in main_job)
    assert all(torch.equal(v, weights(base, "ppo")[k]) for k, v in weights(run, "ppo").items())
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| base ``", "| again `->`"]
    rm = json.loads((again / "round-1" / "reward" / "eval.json").read_text())
    assert lines[5].split(" | ")[1] == f"{rm['gold_accuracy']:.3f}"
    # on the round-1 policy's own answers (the run's round-2 rankings): a figure, the same for the same reward model
    on_policy = [float(line.split(" | ")[2]) for line in lines[4:]]
    assert all(0 <= x <= 1 for x in on_policy) and on_policy[0] == on_policy[1]
    b = json.loads((base / "eval.json").read_text())["stages_dev"]["round-1/ppo"]
    gain = b["gold_score"] - own["stages_dev"]["sft"]["gold_score"]  # paired on the same dev prompts: the means' difference
    assert abs(float(lines[4].split(" | ")[3].split(" [")[0]) - gain) <= 0.0005 + 1e-9
    # a NAME given other flags is trained anew, not taken from the folder of its old flags; the flags reach
    # both stages (each one's weights change) and the table names them
    lines = round1("again=--epochs 1 -> --iterations 1")
    for stage in ("reward", "ppo"):
        main_job = weights(run, stage)
        assert any(not torch.equal(main_job[k], weights(again, stage)[k]) for k in main_job)
    assert lines[4].split(" | ")[0] == "| again `--epochs 1 -> --iterations 1`"
    # a flag the stage refuses: the stage's one message and its exit code 2, no traceback of the experiment's
    proc = experiment("round1.py", "--runs", tmp_path, "--seeds", "0", "--preset", "micro", "--settings",
                      "bad=--probe-every 0", timeout=300)
    assert proc.returncode == 2 and "probe" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
