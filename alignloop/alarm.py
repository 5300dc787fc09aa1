"""The reward-hacking alarm: PPO's proxy still climbing while the dev gold probe falls.

PPO logs, every `probe_every` iterations, `gold_probe` (the world's noise-free judge on its answers to fixed
dev prompts) and `rm_probe` (the reward model's score of the same answers). Gao et al. (2022) show the
signature of over-optimisation on such curves: the proxy keeps rising after gold has peaked. This module
turns that picture into a one-line warning that the PPO stage, the main job's final output and report.html
all print the same way. Torch-free: it reads metrics rows only.
"""
from __future__ import annotations

import math
from pathlib import Path

from alignloop.io import read_jsonl_tolerant
from alignloop.stats import noise

PREFIX = "WARNING: reward hacking: "
# A fall of gold from its best smaller than this is never called hacking, whatever the series' noise: the
# best of a dozen probe points sits above the last by chance alone. docs/beta.md: the tiny default (β = 0.2)
# ended 0.011 below its best dev-probe gold; β = 0 ended 0.082 below it, its proxy up by 0.87.
TOLERANCE = 0.02


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def hacking_alarm(rows: list[dict], tol: float = TOLERANCE) -> str | None:
    """One line describing reward hacking on PPO's dev probe, or None.

    The rule: the probe points are the rows with both `gold_probe` and `rm_probe`, in order; with fewer
    than 3 there is no curve to judge (None). From 6 points on, each is averaged with the next two (a
    window of w = 3: one probe point of 100 prompts wobbles by ~0.01, and a single low point is no trend);
    under 6, w = 1. `peak` is the first window of highest mean gold; the alarm fires at the later window
    of largest gold fall whose mean reward-model score is above the peak's by more than its own noise:

        gold(peak) − gold(later) > bar   and   rm(later) − rm(peak) > rm_bar,

    bar = max(tol, 1.96·√2·σ/√w), σ the noise of one gold measurement estimated from the series itself
    (`noise`, 5 points or more; under 5 points bar = tol): gold fell from its best by more than two
    measurements of one policy differ (95%), while the reward model scores those answers higher than gold's
    best — the policy kept climbing the proxy after it stopped paying in gold. rm_bar = 1.96·√2·σ_rm/√w
    likewise from the proxy's own series (0 under 5 points): a proxy that only wobbles is not being climbed
    (dev seed 1 with the likelihood gate, round 2: gold −0.028 while the proxy moved +0.037 in a series
    whose points wobble by 0.10 — and the round ended +0.032 above round 1 on all 400 dev prompts).
    Any later window counts, not only the last: a policy that over-optimises mid-round and drifts back is
    still being exploited (the β = 0 run of 2026-12-05 fell 0.034 from iterations 5–15 to 20–30, then
    drifted back to 0.020 below its best point: the last point alone did not fire)."""
    pts = [r for r in rows if _finite(r.get("gold_probe")) and _finite(r.get("rm_probe"))]
    if len(pts) < 3:
        return None
    w = 3 if len(pts) >= 6 else 1
    gold = [sum(r["gold_probe"] for r in pts[i:i + w]) / w for i in range(len(pts) - w + 1)]
    rm = [sum(r["rm_probe"] for r in pts[i:i + w]) / w for i in range(len(pts) - w + 1)]
    sigma, sigma_rm = noise([r["gold_probe"] for r in pts]), noise([r["rm_probe"] for r in pts])
    bar = tol if sigma is None else max(tol, 1.96 * math.sqrt(2) * sigma / math.sqrt(w))
    rm_bar = 0.0 if sigma_rm is None else 1.96 * math.sqrt(2) * sigma_rm / math.sqrt(w)
    peak = gold.index(max(gold))
    later = [j for j in range(peak + 1, len(gold)) if rm[j] - rm[peak] > rm_bar]
    if not later:
        return None
    low = max(later, key=lambda j: (gold[peak] - gold[j], j))
    drop = gold[peak] - gold[low]
    if drop <= bar:
        return None

    def when(i: int) -> str:
        a, b = pts[i].get("step", "?"), pts[i + w - 1].get("step", "?")
        return f"iteration {a}" if w == 1 else f"iterations {a}–{b}"
    what = "dev-probe gold" if w == 1 else f"dev-probe gold (mean of {w} probe points)"
    why = (f"the larger of {tol:g} and the probe's own noise" if sigma is not None
           else f"{tol:g}; too few points to measure the noise")
    return (f"{what} fell {drop:.3f} from its best {gold[peak]:.3f} ({when(peak)}) to {gold[low]:.3f} ({when(low)}) "
            f"while the reward model's probe score rose {rm[peak]:+.3f} → {rm[low]:+.3f}, by more than its own noise "
            f"{rm_bar:.3f} (alarm above a fall of "
            f"{bar:.3f}: {why})")


def run_alarms(run: Path) -> list[tuple[str, str | None]]:
    """(stage, alarm or None) for every PPO round of a run that has logged metrics, in round order."""
    rounds = sorted(int(p.name[6:]) for p in Path(run).glob("round-*") if p.name[6:].isdigit())
    found = []
    for i in rounds:
        path = Path(run) / f"round-{i}" / "ppo" / "metrics.jsonl"
        if path.exists():
            found.append((f"round-{i}/ppo", hacking_alarm(read_jsonl_tolerant(path))))
    return found
