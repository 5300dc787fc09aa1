"""The arena leaderboard: a Bradley–Terry fit of the votes, with bootstrap 95% intervals.

P(i beats j) = p_i / (p_i + p_j). Fitted by Hunter's (2004) MM iterations
    p_i ← W_i / Σ_j n_ij / (p_i + p_j)
on all votes at once, so the result does not depend on the order the votes came in (online Elo does).
A tie — and "both bad" — counts half a win to each side (as Chatbot Arena does). A weak prior of
`prior` virtual wins each way between every two models keeps a model that never won finite.
Scores are shown on the familiar Elo scale: 400·log10(p) + 1000, geometric mean 1000.
"""
from __future__ import annotations

import numpy as np

WIN = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.5, 0.5)}
# The pages show a model's interval once it has this many battles: a bootstrap of a handful of votes
# gives an interval that looks precise and is not (the API returns lo/hi always).
MIN_BATTLES = 10


def fit(votes: list[tuple[str, str, str]], models: list[str] | None = None, prior: float = 0.5,
        iters: int = 1000, tol: float = 1e-10) -> dict[str, float]:
    """votes: (model_a, model_b, winner in a|b|tie|both_bad) → {model: Elo-scale score}."""
    names, data = _encode(votes, models)
    if not names:
        return {}
    return dict(zip(names, map(float, _scores(_wins(*data, len(names)), prior, iters, tol))))


def _encode(votes, models):
    votes = [v for v in votes if v[0] != v[1]]
    names = sorted({m for a, b, _ in votes for m in (a, b)} | set(models or []))
    idx = {m: i for i, m in enumerate(names)}
    ia = np.array([idx[a] for a, _, _ in votes], dtype=int)
    ib = np.array([idx[b] for _, b, _ in votes], dtype=int)
    wa = np.array([WIN[w][0] for _, _, w in votes], dtype=float)
    return names, (ia, ib, wa)


def _wins(ia, ib, wa, m):
    wins = np.zeros((m, m))                                              # wins[i, j]: i beat j
    np.add.at(wins, (ia, ib), wa)
    np.add.at(wins, (ib, ia), 1 - wa)
    return wins


def _scores(wins: np.ndarray, prior: float, iters: int, tol: float) -> np.ndarray:
    m = len(wins)
    wins = wins + prior * (1 - np.eye(m))
    games = wins + wins.T                                                # n_ij
    total = wins.sum(1)                                                  # W_i
    p = np.ones(m)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        new = np.where(denom > 0, total / np.where(denom > 0, denom, 1), p)
        new = np.where(new > 0, new, 1e-12)
        new /= np.exp(np.log(new).mean())                                # geometric mean 1
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    return 400 * np.log10(p) + 1000


def leaderboard(votes: list[tuple[str, str, str]], models: list[str] | None = None, rounds: int = 200,
                seed: int = 0, prior: float = 0.5) -> list[dict]:
    """Rows {model, score, lo, hi, battles, wins, ties}, best first; lo/hi: bootstrap 95% interval
    (votes resampled with replacement `rounds` times, each resample refitted). A model in `models`
    with no vote yet is listed last with score, lo and hi None (the prior alone would place it mid-table)."""
    names, (ia, ib, wa) = _encode(votes, None)
    votes = [v for v in votes if v[0] != v[1]]
    rows = []
    if names:
        scores = _scores(_wins(ia, ib, wa, len(names)), prior, 1000, 1e-10)
        rng = np.random.default_rng(seed)
        boot = np.tile(scores, (rounds, 1))
        for r in range(rounds):
            k = rng.integers(0, len(votes), len(votes))
            boot[r] = _scores(_wins(ia[k], ib[k], wa[k], len(names)), prior, 300, 1e-8)
        lo, hi = np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)
        for i, n in enumerate(names):
            mine = [v for v in votes if n in v[:2]]
            won = sum(1 for a, b, w in mine if (w == "a" and a == n) or (w == "b" and b == n))
            ties = sum(1 for _, _, w in mine if w in ("tie", "both_bad"))
            rows.append({"model": n, "score": float(scores[i]), "lo": float(min(lo[i], scores[i])),
                         "hi": float(max(hi[i], scores[i])), "battles": len(mine), "wins": won, "ties": ties})
        rows.sort(key=lambda r: -r["score"])
    for n in models or []:
        if n not in names:
            rows.append({"model": n, "score": None, "lo": None, "hi": None, "battles": 0, "wins": 0, "ties": 0})
    return rows
