"""RLOO (`alignloop ppo --algo rloo`): the leave-one-out baseline and GRPO's normalisation by hand, the
sequence reward with its KL penalty, one iteration on micro raising the objective on its own rollout, no
value model anywhere, and a batch that is not a multiple of K refused.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignloop import cli  # noqa: E402
from alignloop.config import resolve  # noqa: E402
from alignloop.scoring import RewardScorer  # noqa: E402
from alignloop.train import ppo as P  # noqa: E402
from alignloop.train import rl  # noqa: E402
from tests.test_reward import build_rlhf_run  # noqa: E402


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------- the maths by hand


def test_leave_one_out_baseline_and_advantages_by_hand():
    # prompt A: R = (1, 2, 3, 6), sum 12: baselines (12−1)/3 = 11/3, 10/3, 9/3, 6/3
    #   A = 1 − 11/3 = −8/3, 2 − 10/3 = −4/3, 3 − 3 = 0, 6 − 2 = 4 (sum 0; = 4/3·(R − mean 3))
    # prompt B: R = (0, 0, 0, −4): baselines −4/3, −4/3, −4/3, 0 → A = 4/3, 4/3, 4/3, −4
    R_ = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, -4.0])
    close(rl.rloo_advantages(R_, 4), [-8 / 3, -4 / 3, 0.0, 4.0, 4 / 3, 4 / 3, 4 / 3, -4.0])
    # k = 2: each answer's baseline is the other one: A = ±(R_1 − R_2)
    close(rl.rloo_advantages(torch.tensor([0.5, -0.5, 2.0, 2.0]), 2), [1.0, -1.0, 0.0, 0.0])


def test_group_norm_is_grpos_standardised_reward_by_hand():
    # prompt A: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3) = 2.1602469 → (−2, −1, 0, 3) / 2.1602469
    # prompt B: all equal → 0 (no signal), not a division by zero
    R_ = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    s = math.sqrt(14 / 3)
    close(rl.rloo_advantages(R_, 4, group_norm=True), [-2 / s, -1 / s, 0.0, 3 / s, 0.0, 0.0, 0.0, 0.0], 1e-5)


def test_sequence_reward_carries_the_kl_penalty():
    # RLOO's return = the per-token rewards summed = score − β·Σ_t KL_t over real tokens
    # row 0: 2 − 0.1·(0.5 − 0.2 + 1.0) = 1.87 ; row 1: −1 − 0.1·(0.3 + 0.1) = −1.04 (padding's 9s ignored)
    kl = torch.tensor([[0.5, -0.2, 1.0, 7.0], [0.3, 0.1, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(rl.token_rewards(torch.tensor([2.0, -1.0]), kl * mask, mask, 0.1).sum(1), [1.87, -1.04])


# ---------------------------------------------------------------- one iteration on micro


@pytest.fixture(scope="session")
def rlhf(micro_run) -> Path:
    return build_rlhf_run(micro_run)


ONE = dict(algo="rloo", rloo_k=4, iterations=1, batch_size=16, minibatch_size=8, ppo_epochs=4, lr=3e-4, kl_coef=0.0,
           missing_end_penalty=0.0, probe_prompts=0, checkpoint_every=1, max_new_tokens=24)


@pytest.fixture(scope="module")
def one_iteration(rlhf, tmp_path_factory):
    """One RLOO iteration run for real, its rollout batch and RM scores captured on the way."""
    out = tmp_path_factory.mktemp("rloo") / "run"
    shutil.copytree(rlhf, out)
    seen: dict = {}
    mp = pytest.MonkeyPatch()
    real_layout, real_score = P.layout, RewardScorer.score_ids
    mp.setattr(P, "layout", lambda *a, **k: seen.setdefault("layout", real_layout(*a, **k)))
    mp.setattr(RewardScorer, "score_ids", lambda self, seqs, starts=None: seen.setdefault("score", real_score(self, seqs, starts)))
    try:
        P.run(resolve(P.Config, "ppo", preset="micro", presets=P.PRESETS, flags=ONE), out)
    finally:
        mp.undo()
    return out, seen


def test_one_iteration_raises_the_objective_on_its_rollout(one_iteration):
    """On the rollout the iteration trained on (β = 0: the objective is the RM score), the answers' log-prob
    changes Δ_i move along their leave-one-out advantages: Σ A_i·Δ_i > 0, and the importance-sampling
    estimate of the new policy's score on each prompt's own answers rose above their mean on average."""
    from alignloop.model import load_causal_lm
    out, seen = one_iteration
    ids, attn, pos, mask, p_len = seen["layout"]
    score = torch.tensor(seen["score"])
    with torch.no_grad():
        old = P.action_logprobs(load_causal_lm(out / "sft"), ids, attn, pos, p_len)
        new = P.action_logprobs(load_causal_lm(out / "round-1" / "rloo"), ids, attn, pos, p_len)
    delta = ((new - old) * mask).sum(1)
    adv = rl.rloo_advantages(score, 4)
    assert score.std() > 0
    assert (adv * delta).sum() > 0, (adv, delta)
    # per prompt, the self-normalised importance weights exp(Δ_i) move the expected score above the mean
    per_prompt = [(torch.softmax(delta[g:g + 4], 0) * score[g:g + 4]).sum() for g in range(0, len(score), 4)]
    assert sum(per_prompt) / len(per_prompt) > score.mean()
    # the 4 episodes of a prompt share it: rows 4g..4g+3 have one prompt
    prompts = ids[:, :p_len]
    for g in range(0, len(prompts), 4):
        assert all(torch.equal(prompts[g], prompts[g + j]) for j in range(4))


def test_no_value_model_and_its_own_stage(one_iteration):
    out, _ = one_iteration
    stage = out / "round-1" / "rloo"
    assert not (out / "round-1" / "ppo").exists()
    (rec,) = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert "vf_loss" not in rec and rec["explained_variance"] is None
    for key in ("rm_score", "kl_sampled", "pg_loss", "clip_frac", "approx_kl", "entropy", "first_ratio_error"):
        assert key in rec
    assert rec["first_ratio_error"] < 1e-5
    ck = torch.load(stage / "checkpoints" / "step-000001.pt", weights_only=True)
    assert "value" not in ck and "optim_value" not in ck
    import tomllib
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["rloo"]["algo"] == "rloo" and cfg["rloo"]["rloo_k"] == 4 and "ppo" not in cfg
    from alignloop.rundir import stage_models
    assert stage_models(out)["round-1/rloo"] == stage_models(out)["rloo"] == stage


def test_batch_that_is_not_a_multiple_of_k_is_refused(rlhf, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(rlhf, out)
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as e:
        cli.main(["ppo", "--preset", "micro", "--out", str(out), "--algo", "rloo", "--rloo-k", "3", "--batch-size", "16"])
    assert e.value.code == 2
    assert "field 'batch_size'" in capsys.readouterr().err
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_the_recipe_refuses_rloo_or_best_of_n_in_its_config(tmp_path, capsys):
    """`alignloop run` trains PPO in its rounds and evaluates each policy once; a TOML that asks for RLOO or
    best-of-n there is refused before any work (they are commands of their own)."""
    for table, field in (('[ppo]\nalgo = "rloo"\n', "algo"), ("[eval]\nbest_of = 4\n", "best_of")):
        toml = tmp_path / f"{field}.toml"
        toml.write_text(table)
        with pytest.raises(SystemExit) as e:
            cli.main(["run", "--preset", "micro", "--out", str(tmp_path / "run"), "--config", str(toml)])
        assert e.value.code == 2
        assert f"field '{field}'" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
