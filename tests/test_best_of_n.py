"""Best-of-n (`alignloop eval --best-of N`): the pick and the analytic KL by hand, and on micro: the answer
judged is the reward model's best of N, stored as stage bo<N>; refused without a reward model or N < 1.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from alignloop import cli  # noqa: E402
from alignloop.evaluate import bo_stage  # noqa: E402
from alignloop.stats import best_of_n_kl, pick_best  # noqa: E402
from tests.test_reward import build_rlhf_run  # noqa: E402


def test_pick_best_takes_the_argmax_of_each_group_first_of_ties():
    scores = [0.1, 0.5, 0.5, -1.0, 2.0, 0.0, -3.0, -2.0, -2.5]
    assert pick_best(scores, 3) == [1, 4, 7]      # group 0: 0.5 twice → the first (index 1)
    assert pick_best(scores, 1) == list(range(9))
    assert pick_best([1.0, 3.0, 2.0, 0.0], 4) == [1]


def test_analytic_kl_of_best_of_n_by_hand():
    # log N − (N − 1)/N: N = 1 → 0; N = 2 → 0.693147 − 0.5 = 0.193147; N = 16 → 2.772589 − 0.9375 = 1.835089
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.193147, abs=1e-6)
    assert best_of_n_kl(16) == pytest.approx(1.835089, abs=1e-6)
    assert bo_stage("sft", 16) == "bo16" and bo_stage("round-1/ppo", 4) == "round-1/ppo/bo4" and bo_stage("sft", 1) == "sft"


@pytest.fixture(scope="session")
def rlhf(micro_run) -> Path:
    return build_rlhf_run(micro_run)


def test_best_of_n_judges_the_reward_models_best_answer(rlhf, tmp_path):
    """The N answers of prompt i are rows i·N + j of the engine's seeds: regenerated here one by one, their
    RM scores are the stored candidates' and the answer judged is the one of the highest."""
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    cli.main(["eval", "--preset", "micro", "--out", str(out), "--best-of", "4", "--max-prompts", "6"])
    bo = json.loads((out / "eval.json").read_text())["stages"]["bo4"]
    assert bo["best_of"] == 4 and bo["kl_bound"] == pytest.approx(math.log(4) - 0.75) and bo["kl_exact"] is None
    from alignloop.engine import Engine, row_seed
    from alignloop.model import load_causal_lm
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.scoring import RewardScorer
    from alignloop.world import load_world
    prompts = load_world(out).prompts("test")[:6]
    tok = ChatTokenizer.load(out / "sft")
    engine = Engine(load_causal_lm(out / "sft"), tok, "cpu")
    scorer = RewardScorer(out / "round-1" / "reward", "cpu")
    best = []
    for i, (p, e) in enumerate(zip(prompts, bo["examples"])):
        outs = engine.generate([tok.render_prompt(p["messages"])] * 4, max_new_tokens=32, temperature=1.0,
                               seed=[row_seed(1234, i * 4 + j) for j in range(4)])
        texts = [o.text.strip() for o in outs]
        scores = scorer.score_texts([p["messages"]] * 4, texts)
        assert e["id"] == p["id"] and e["rm_candidates"] == pytest.approx(scores, abs=1e-5)
        assert e["answer"] == texts[pick_best(scores, 4)[0]]
        best.append(max(scores))
    assert bo["rm_score"] == pytest.approx(sum(best) / len(best), abs=1e-5)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_best_of_n_without_a_reward_model_or_below_one_is_refused(rlhf, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    shutil.rmtree(out / "round-1" / "reward")
    for args, words in ((["--best-of", "2"], ("needs a reward model", "field 'best_of'")),
                        (["--best-of", "0"], ("below the minimum 1", "field 'best_of'"))):
        before = _snapshot(out)
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--preset", "micro", "--out", str(out), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
        assert _snapshot(out) == before
