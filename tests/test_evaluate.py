"""The evaluation's statistics against hand-computed values."""
from __future__ import annotations

import pytest

from alignloop.evaluate import gains_over_sft, mean_ci, paired_gain, wilson_halfwidth


def test_wilson_halfwidth_by_hand():
    # k=3, n=10: 1.96·sqrt(0.3·0.7/10 + 1.96²/400) / (1 + 1.96²/10) = 1.96·sqrt(0.030604) / 1.38416
    assert wilson_halfwidth(3, 10) == pytest.approx(0.247719, abs=1e-6)
    assert wilson_halfwidth(0, 0) == 0.0
    assert wilson_halfwidth(10, 10) > 0  # a perfect rate on few prompts is not certain


def test_mean_ci_by_hand():
    # mean 0.2; sample sd 0.2; half-width 1.96·0.2/sqrt(3)
    assert mean_ci([0.2, 0.0, 0.4]) == pytest.approx((0.2, 0.226321), abs=1e-6)


def test_paired_gain_uses_only_shared_prompts():
    ref = {"examples": [{"id": "a", "gold_score": 0.5}, {"id": "b", "gold_score": 0.5}, {"id": "c", "gold_score": 0.2}]}
    m = {"examples": [{"id": "a", "gold_score": 0.7}, {"id": "b", "gold_score": 0.5}, {"id": "c", "gold_score": 0.6},
                      {"id": "z", "gold_score": 0.0}]}  # "z" was not answered by ref: left out
    mean, half, n = paired_gain(m, ref)
    assert (round(mean, 6), round(half, 6), n) == (0.2, 0.226321, 3)
    assert paired_gain(m, {"examples": []}) is None
    # every stage after SFT, none for base and SFT themselves, none without an SFT stage
    stages = {"base": ref, "sft": ref, "round-1/ppo": m}
    assert [(s, round(g[0], 6)) for s, g in gains_over_sft(stages)] == [("round-1/ppo", 0.2)]
    assert gains_over_sft({"base": ref, "round-1/ppo": m}) == []


def test_paired_interval_is_narrower_than_the_stages_own_when_prompts_differ():
    # Prompts of very different difficulty, the same small gain on each: each stage's own interval is
    # wide, the paired one is zero-width — the reason the run prints the paired gain.
    golds = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8]
    ref = {"examples": [{"id": str(i), "gold_score": g} for i, g in enumerate(golds)]}
    m = {"examples": [{"id": str(i), "gold_score": g + 0.05} for i, g in enumerate(golds)]}
    mean, half, _ = paired_gain(m, ref)
    assert mean == pytest.approx(0.05) and half == pytest.approx(0.0, abs=1e-9)
    assert mean_ci(golds)[1] > 0.2
