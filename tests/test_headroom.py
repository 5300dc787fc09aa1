"""The headroom table (alignloop/headroom.py): its pure parts on hand-computed numbers, its text and HTML
renderings, and one micro run of the step (SFT's K answers, a round-1 reward model's held-out accuracy)."""
from __future__ import annotations

import json
import time

import pytest

from alignloop.headroom import accuracy_by_category, category_gains, format_lines, order_accuracy, sample_summary, table


def close(a, b):
    return a is not None and abs(a - b) < 1e-9


def test_sample_summary_mean_best_of_k_and_rm_pick():
    # prompt 1 (a): golds 0.2, 0.8, the RM prefers the first; prompt 2 (a): 0.5, 0.5, an RM tie (the first
    # wins); prompt 3 (b): 1.0, 0.0, an RM tie.  a: mean (0.2+0.8+0.5+0.5)/4 = 0.5, best (0.8+0.5)/2 = 0.65,
    # RM pick (0.2+0.5)/2 = 0.35;  b: 0.5, 1.0, 1.0;  all: 3.0/6 = 0.5, 2.3/3, 1.7/3.
    s = sample_summary(["a", "a", "b"], [[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [0.0, 0.0], [0.3, 0.3]])
    assert list(s) == ["a", "b", "all"]
    assert s["a"]["n_prompts"] == 2 and close(s["a"]["mean"], 0.5) and close(s["a"]["best_of_k"], 0.65)
    assert close(s["a"]["rm_pick"], 0.35)
    assert close(s["b"]["mean"], 0.5) and close(s["b"]["best_of_k"], 1.0) and close(s["b"]["rm_pick"], 1.0)
    assert s["all"]["n_prompts"] == 3 and close(s["all"]["best_of_k"], 2.3 / 3) and close(s["all"]["rm_pick"], 1.7 / 3)
    assert sample_summary(["a"], [[0.1, 0.3]])["a"]["rm_pick"] is None   # no reward model: no pick


def test_order_accuracy_counts_pairs_of_different_gold():
    # pairs (0,1) and (0,2) differ in gold and the RM orders them as gold does; (1,2) tie in gold: not counted
    assert order_accuracy([3.0, 2.0, 1.0], [1.0, 0.5, 0.5]) == (2, 2)
    assert order_accuracy([1.0, 2.0, 3.0], [1.0, 0.5, 0.5]) == (0, 2)
    assert order_accuracy([1.0, 1.0], [0.0, 1.0]) == (0, 1)    # an RM tie prefers the first (reward.evaluate)
    assert order_accuracy([1.0, 1.0], [0.3, 0.3]) == (0, 0)


def test_accuracy_by_category():
    acc = accuracy_by_category([("a", [3.0, 2.0, 1.0], [1.0, 0.5, 0.5]), ("a", [1.0, 1.0], [0.0, 1.0]),
                                ("b", [0.0, 1.0], [0.5, 0.5])])
    assert close(acc["a"]["accuracy"], 2 / 3) and acc["a"]["n_pairs"] == 3
    assert acc["b"] == {"accuracy": None, "n_pairs": 0}
    assert close(acc["all"]["accuracy"], 2 / 3) and acc["all"]["n_pairs"] == 3


def stage(gold, cats):
    return {"gold_score": gold, "categories": {c: {"gold_score": g} for c, g in cats.items()}}


def test_category_gains_prefer_dev_and_skip_other_stages():
    test = {"sft": stage(0.60, {"harmful": 0.90, "task": 0.30}),
            "round-1/ppo": stage(0.65, {"harmful": 0.95, "task": 0.30}),
            "round-2/ppo": stage(0.70, {"harmful": 0.92, "task": 0.45}),
            "bo4": stage(0.9, {"harmful": 1.0, "task": 1.0})}
    test["ppo"] = test["round-2/ppo"]
    g = category_gains({"stages": test})
    assert g["split"] == "test" and list(g["stages"]) == ["round-1/ppo", "round-2/ppo"]
    assert close(g["stages"]["round-1/ppo"]["harmful"], 0.05) and close(g["stages"]["round-1/ppo"]["task"], 0.0)
    assert close(g["stages"]["round-2/ppo"]["task"], 0.15) and close(g["stages"]["round-2/ppo"]["all"], 0.10)
    dev = category_gains({"stages": test, "stages_dev": {"sft": stage(0.5, {"task": 0.2}),
                                                         "round-1/ppo": stage(0.6, {"task": 0.5})}})
    assert dev["split"] == "dev" and close(dev["stages"]["round-1/ppo"]["task"], 0.3)
    assert category_gains({}) == {"split": "test", "stages": {}}


HEADROOM = {"split": "dev", "k": 2, "temperature": 1.0, "rm_pick_model": "round-1/reward",
            "categories": sample_summary(["harmful", "harmful", "task"], [[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]],
                                         [[1.0, 0.0], [0.0, 0.0], [0.3, 0.3]]),
            "rm_accuracy": {"round-1": accuracy_by_category([("harmful", [3.0, 2.0, 1.0], [1.0, 0.5, 0.5]),
                                                             ("harmful", [1.0, 1.0], [0.0, 1.0])])},
            "gains": {"split": "test", "stages": {"round-1/ppo": {"harmful": 0.05, "all": 0.02}}}}


def test_table_rows_and_text():
    head, rows = table(HEADROOM)
    assert head == ["category", "n", "SFT mean", "best of 2", "headroom", "RM pick of 2", "RM acc. round-1", "gain round-1"]
    assert rows[0] == ["harmful", "2", "0.500", "0.650", "+0.150", "0.350", "0.667", "+0.050"]
    assert rows[1] == ["task", "1", "0.500", "1.000", "+0.500", "1.000", "–", "–"]   # no held-out task item, no gain
    assert rows[-1][0] == "all"
    lines = format_lines(HEADROOM)
    assert len(lines) == 4 and len({len(x) for x in lines}) == 1     # aligned columns
    assert lines[1].startswith("harmful ") and lines[1].endswith("+0.050")


def test_report_section_and_final_output(tmp_path, capsys):
    from alignloop.pipeline import _print_headroom
    from alignloop.report import headroom_section
    assert "No headroom.json in this run" in headroom_section(tmp_path)
    (tmp_path / "headroom.json").write_text(json.dumps(HEADROOM))
    html = headroom_section(tmp_path)
    assert "<th class=l>category</th>" in html and "<td class=l>harmful</td>" in html and "+0.150" in html
    assert "sampling has no headroom" in html and "round-1/reward" in html
    _print_headroom(tmp_path)
    out = capsys.readouterr().out
    assert "where the gain is lost" in out and "\n  harmful " in out and "3 dev prompts" in out and "on test prompts" in out


@pytest.mark.slow
def test_the_step_writes_headroom_json_on_micro(micro_copy):
    """pretrain/ stands in for sft/ (any causal LM does); round 1 sampled, ranked and a reward model trained
    on micro. The per-category accuracy adds up to what `alignloop reward` measured on the same held-out
    comparisons (its eval.json): the held-out split is rebuilt as reward.run builds it."""
    import shutil
    from alignloop import config as C
    from alignloop import evaluate, headroom
    from alignloop.cli import run_stage
    from alignloop.train import reward
    run = micro_copy
    shutil.copytree(run / "pretrain", run / "sft", ignore=shutil.ignore_patterns("checkpoints"))
    for name in ("sample", "rank", "reward"):
        run_stage(name, ["--preset", "micro", "--out", str(run)])
    ecfg = C.resolve(evaluate.Config, evaluate.SECTION, preset="micro", presets=evaluate.PRESETS)
    rcfg = C.resolve(reward.Config, reward.SECTION, preset="micro", presets=reward.PRESETS)
    ecfg.device = rcfg.device = "cpu"
    t = time.perf_counter()
    headroom.run(run, ecfg, [rcfg])
    seconds = time.perf_counter() - t
    h = json.loads((run / "headroom.json").read_text())
    assert seconds < 60, seconds
    assert h["k"] == headroom.K and h["split"] == "dev" and h["rm_pick_model"] == "round-1/reward"
    assert {"known_fact", "unknown_fact", "harmful", "task", "multi_turn", "all"} <= set(h["categories"])
    for c in h["categories"].values():
        assert 0 <= c["mean"] <= c["best_of_k"] <= 1 and 0 <= c["rm_pick"] <= c["best_of_k"]
    measured = json.loads((run / "round-1" / "reward" / "eval.json").read_text())
    mine = h["rm_accuracy"]["round-1"]["all"]
    assert mine["n_pairs"] == measured["n_gold_pairs"] and abs(mine["accuracy"] - measured["gold_accuracy"]) < 0.01
    assert headroom.covers(run, 1) and not headroom.covers(run, 2)
