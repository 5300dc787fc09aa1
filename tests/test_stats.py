"""The statistics (alignloop/stats.py) against hand-computed values; the module imports without torch."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from alignloop.stats import (fit_gao_rl, fmt_interval, gains_over_sft, gao_peak, mean_ci, paired_gain, wilson_halfwidth,
                             wilson_interval)


def test_imports_without_torch():
    code = "import sys; import alignloop.stats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


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


def test_wilson_interval_by_hand():
    # k=0, n=10: centre (0 + 1.96²/20) / (1 + 1.96²/10) = 0.19208 / 1.38416 = 0.138770, and the
    # half-width 1.96·sqrt(1.96²/400) / 1.38416 is the same number: [0, 0.277540]
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.277540, abs=1e-6)
    # k=3, n=10: centre (0.3 + 0.19208) / 1.38416 = 0.355508, half-width 0.247719 (above): asymmetric about 0.3
    lo, hi = wilson_interval(3, 10)
    assert (lo, hi) == (pytest.approx(0.107789, abs=1e-6), pytest.approx(0.603227, abs=1e-6))
    assert 0.3 - lo < hi - 0.3
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    assert fmt_interval((0.1078, 0.6032), ".2f") == "[0.11, 0.60]"


def test_gao_fit_recovers_known_alpha_beta():
    # R(d) = d(0.3 − 0.1·log d): R(1) = 0.3, R(e) = e·(0.3 − 0.1) = 0.543656; two points determine α, β
    alpha, beta = fit_gao_rl([1.0, math.e], [0.3, math.e * 0.2])
    assert (alpha, beta) == (pytest.approx(0.3, abs=1e-12), pytest.approx(0.1, abs=1e-12))
    # the peak: d* = exp(0.3/0.1 − 1) = e² = 7.389056, at KL = e⁴ = 54.598
    assert gao_peak(0.3, 0.1) == pytest.approx(math.e ** 2, rel=1e-12)
    assert gao_peak(0.3, 0.0) is None and gao_peak(0.3, -0.1) is None
    # many points with noise: close to the truth, and a least-squares solution (residuals orthogonal to
    # both features); points at d = 0 are left out (R(0) = 0 by the form)
    rng = random.Random(0)
    d = [0.0] + [0.1 * i for i in range(1, 40)]
    r = [x * (0.25 - 0.08 * math.log(x)) + rng.gauss(0, 0.005) if x else 0.7 for x in d]
    alpha, beta = fit_gao_rl(d, r)
    assert alpha == pytest.approx(0.25, abs=0.01) and beta == pytest.approx(0.08, abs=0.01)
    res = [y - x * (alpha - beta * math.log(x)) for x, y in zip(d[1:], r[1:])]
    assert abs(sum(x * e for x, e in zip(d[1:], res))) < 1e-9
    assert abs(sum(-x * math.log(x) * e for x, e in zip(d[1:], res))) < 1e-9
    with pytest.raises(ValueError):
        fit_gao_rl([1.0, 1.0, 0.0], [0.2, 0.3, 0.0])
