"""The statistics of the evaluation, the report and the experiments, as small pure functions: no torch,
no files (each unit-tested against hand-computed values in tests/test_stats.py).

Intervals are 95%: a rate's is Wilson's (not symmetric about the rate), a mean's the normal
approximation, a gain of one stage over another paired over the prompts both answered. Also: Gao et
al.'s (2022) functional form for RL fitted in closed form, the noise of a series from its second
differences, distinct-n, and best-of-n's pick and analytic KL.
"""
from __future__ import annotations

import math


def wilson_halfwidth(k: int, n: int, z: float = 1.96) -> float:
    """Half-width of the Wilson 95% interval of a rate k/n (sane at rates near 0 or 1)."""
    if n == 0:
        return 0.0
    p = k / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval [lo, hi] of a rate k/n: centred on (p + z²/2n) / (1 + z²/n), not on p, so
    it stays inside [0, 1] (0 of 10 gives [0, 0.278], where p ± half-width would give [−0.14, 0.14])."""
    if n == 0:
        return 0.0, 1.0
    centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
    half = wilson_halfwidth(k, n, z)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(mean: float, half: float) -> list[float]:
    """[lo, hi] of a symmetric (normal-approximation) interval."""
    return [mean - half, mean + half]


def fmt_interval(lo_hi, spec: str = ".3f") -> str:
    lo, hi = lo_hi
    return f"[{lo:{spec}}, {hi:{spec}}]"


def mean_ci(xs: list[float], z: float = 1.96) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(1, n - 1)
    return m, z * math.sqrt(var / n)


def paired_gain(m: dict, ref: dict) -> tuple[float, float, int] | None:
    """Gold-score gain of stage m over stage ref on the prompts both answered: mean of the per-prompt
    differences and its 95% half-width. Both stages answer the same held-out prompts, so the paired
    interval leaves out how much prompts differ from each other (a task prompt scores ~0.45, a harmful
    one ~0.95), which dominates each stage's own interval."""
    ref_by_id = {e["id"]: e["gold_score"] for e in ref.get("examples", [])}
    diffs = [e["gold_score"] - ref_by_id[e["id"]] for e in m.get("examples", []) if e["id"] in ref_by_id]
    if not diffs:
        return None
    mean, half = mean_ci(diffs)
    return mean, half, len(diffs)


def gains_over_sft(stages: dict) -> list[tuple[str, tuple[float, float, int]]]:
    """(stage, paired gain) for every stage after SFT — what the run's table and the report show."""
    if "sft" not in stages:
        return []
    return [(s, g) for s, m in stages.items() if s not in ("base", "sft")
            for g in (paired_gain(m, stages["sft"]),) if g]


def fit_gao_rl(d: list[float], r: list[float]) -> tuple[float, float]:
    """Least-squares (α, β) of Gao et al. (2022)'s functional form for RL, R(d) = d(α − β·log d), where
    d = √KL to the initial policy and R is the gold gain over it. R is linear in (α, β), with features
    d and −d·log d, so the fit is the 2×2 normal equations in closed form; points with d = 0 carry no
    information (R(0) = 0 by the form) and are left out."""
    pts = [(x, y) for x, y in zip(d, r) if x > 0]
    f1 = [x for x, _ in pts]
    f2 = [-x * math.log(x) for x, _ in pts]
    s11, s12, s22 = sum(a * a for a in f1), sum(a * b for a, b in zip(f1, f2)), sum(b * b for b in f2)
    s1y, s2y = sum(a * y for a, (_, y) in zip(f1, pts)), sum(b * y for b, (_, y) in zip(f2, pts))
    det = s11 * s22 - s12 * s12
    if len(pts) < 2 or abs(det) < 1e-12 * max(1.0, s11 * s22):
        raise ValueError("the fit needs at least two distinct d > 0 (d = 1 alone cannot separate α from β)")
    return (s1y * s22 - s2y * s12) / det, (s2y * s11 - s1y * s12) / det


def gao_peak(alpha: float, beta: float) -> float | None:
    """d* where R(d) = d(α − β·log d) peaks: R'(d) = α − β·log d − β = 0, so d* = exp(α/β − 1); the KL
    there is d*². None when β ≤ 0 (the form then never turns down)."""
    return math.exp(alpha / beta - 1) if beta > 0 else None


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over every answer (Li et al. 2016)."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def best_of_n_kl(n: int) -> float:
    """The analytic KL of best-of-n sampling to the policy it samples from: log n − (n − 1)/n (exact for
    answers that never tie; an upper bound otherwise). 0 at n = 1."""
    return math.log(n) - (n - 1) / n


def pick_best(scores: list[float], n: int) -> list[int]:
    """Indices of the best of each consecutive group of n scores (the first of equal best)."""
    return [g * n + max(range(n), key=lambda j: (scores[g * n + j], -j)) for g in range(len(scores) // n)]


def mean_sd(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1; None for one value)."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None


def noise(values: list[float]) -> float | None:
    """The noise of one measurement in a series, from its second differences (g[i+1] − 2g[i] + g[i−1],
    whose variance is 6σ² for white noise and which a straight trend does not enter); None under 5 points."""
    if len(values) < 5:
        return None
    d2 = [values[i + 1] - 2 * values[i] + values[i - 1] for i in range(1, len(values) - 1)]
    return math.sqrt(sum(d * d for d in d2) / len(d2) / 6)
