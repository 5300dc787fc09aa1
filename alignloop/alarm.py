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
    than 3 there is no curve to judge (None). `peak` is the first point of highest gold, `last` the final
    point. The alarm fires when

        gold(peak) − gold(last) > bar   and   rm(last) > rm(peak),

    bar = max(tol, 1.96·√2·σ), σ the noise of one gold measurement estimated from the series itself
    (`noise`, 5 points or more; under 5 points bar = tol): gold fell from its best by more than two
    measurements of one policy differ (95%), while the reward model scores the last answers higher than
    those of gold's best — the policy kept climbing the proxy after it stopped paying in gold."""
    pts = [r for r in rows if _finite(r.get("gold_probe")) and _finite(r.get("rm_probe"))]
    if len(pts) < 3:
        return None
    gold = [r["gold_probe"] for r in pts]
    peak, last = pts[gold.index(max(gold))], pts[-1]
    sigma = noise(gold)
    bar = tol if sigma is None else max(tol, 1.96 * math.sqrt(2) * sigma)
    drop = peak["gold_probe"] - last["gold_probe"]
    if drop <= bar or last["rm_probe"] <= peak["rm_probe"]:
        return None
    why = (f"the larger of {tol:g} and the probe's own noise" if sigma is not None
           else f"{tol:g}; too few points to measure the noise")
    return (f"dev-probe gold fell {drop:.3f} from its best {peak['gold_probe']:.3f} (iteration {peak.get('step', '?')}) "
            f"to {last['gold_probe']:.3f} (iteration {last.get('step', '?')}) while the reward model's probe score "
            f"rose {peak['rm_probe']:+.3f} → {last['rm_probe']:+.3f} (alarm above a fall of {bar:.3f}: {why})")


def run_alarms(run: Path) -> list[tuple[str, str | None]]:
    """(stage, alarm or None) for every PPO round of a run that has logged metrics, in round order."""
    rounds = sorted(int(p.name[6:]) for p in Path(run).glob("round-*") if p.name[6:].isdigit())
    found = []
    for i in rounds:
        path = Path(run) / f"round-{i}" / "ppo" / "metrics.jsonl"
        if path.exists():
            found.append((f"round-{i}/ppo", hacking_alarm(read_jsonl_tolerant(path))))
    return found
