"""`alignloop eval` on micro: where its results go in eval.json (its statistics: tests/test_stats.py)."""
from __future__ import annotations


def test_dev_results_never_take_the_place_of_test_results(micro_copy):
    """`eval --split dev` (tuning) writes beside the test figures, never over them nor in their place."""
    import json
    from alignloop.cli import run_stage
    run_stage("eval", ["--preset", "micro", "--out", str(micro_copy), "--stage", "base", "--max-prompts", "8"])
    test = json.loads((micro_copy / "eval.json").read_text())["stages"]["base"]
    run_stage("eval", ["--preset", "micro", "--out", str(micro_copy), "--stage", "base", "--max-prompts", "8",
                       "--split", "dev"])
    data = json.loads((micro_copy / "eval.json").read_text())
    assert data["stages"]["base"] == test and test["split"] == "test"
    dev = data["stages_dev"]["base"]
    assert dev["split"] == "dev" and {e["id"] for e in dev["examples"]}.isdisjoint(e["id"] for e in test["examples"])
