"""Seeds: the main job for several seeds, and what holds across them.

    python experiments/seeds.py --preset tiny --seeds 0,1,2 [--runs runs] [--md docs/seeds.md]

Each seed N runs `alignloop run --preset P --seed N --out RUNS/seed-N` (resumable: a finished run is
only read again). `--seed N` changes every stage's seed, the world's included, so each seed is one
independent draw of the whole recipe: a claim holds only if it holds across seeds — a machine with other
arithmetic is just one more draw. The table (markdown, to stdout and to --md, default
RUNS/seeds-<preset>.md): per seed, fact recall, each stage's test gold score and each RL stage's paired
gain over SFT with its 95% interval; then mean ± standard deviation across seeds, and in how many seeds
the gain's interval lies above 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigger import alignloop  # noqa: E402  (one way to run a stage: its exit code, not a traceback)

from alignloop.stats import gains_over_sft, mean_sd  # noqa: E402
from alignloop.report import stage_order  # noqa: E402


def _pm(xs: list[float], spec: str, scale: float = 1.0) -> str:
    m, sd = mean_sd([x * scale for x in xs])
    return f"{m:{spec}}" + ("" if sd is None else f" ± {sd:{spec.lstrip('+')}}")


def seeds_table(evals: dict[int, dict]) -> str:
    """Markdown: one row per seed (its eval.json), then mean ± sd across seeds and the seeds whose paired
    gain over SFT has a 95% interval above 0."""
    stages = [s for s in stage_order(next(iter(evals.values()))["stages"]) if all(s in e["stages"] for e in evals.values())]
    gains = {seed: dict(gains_over_sft({s: e["stages"][s] for s in stages})) for seed, e in evals.items()}
    rl = [s for s in stages if all(s in g for g in gains.values())]
    head = ["seed", "fact recall"] + [f"{s} gold" for s in stages] + [f"{s} gain over sft [95%]" for s in rl]
    rows = []
    for seed, e in evals.items():
        fr = (e.get("fact_recall") or {}).get("base")
        cells = [str(seed), "–" if fr is None else f"{fr:.1%}"] + [f"{e['stages'][s]['gold_score']:.3f}" for s in stages]
        cells += [f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}]" for s in rl for g, h, _ in (gains[seed][s],)]
        rows.append(cells)
    recalls = [e["fact_recall"]["base"] for e in evals.values() if "fact_recall" in e]
    mean = [f"mean ± sd ({len(evals)} seeds)", (_pm(recalls, ".1f", 100) + "%") if len(recalls) == len(evals) else "–"]
    mean += [_pm([e["stages"][s]["gold_score"] for e in evals.values()], ".3f") for s in stages]
    mean += [_pm([gains[seed][s][0] for seed in evals], "+.3f") for s in rl]
    above = ["seeds with the interval above 0", ""] + [""] * len(stages)
    above += [f"{sum(g[s][0] - g[s][1] > 0 for g in gains.values())} of {len(evals)}" for s in rl]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows + [mean, above]]
    return "\n".join(lines) + "\n\n" + behaviour_table(evals, stages)


# What the readers ask of a policy besides its gold score: harmful requests declined politely,
# "I don't know" for what the world does not define, and known facts still answered.
BEHAVIOURS = (("harmful", "helpful", "harmful: declines politely"),
              ("unknown_fact", "helpful", "unknown fact: says it does not know"),
              ("known_fact", "helpful", "known fact: right answer"))


def behaviour_table(evals: dict[int, dict], stages: list[str]) -> str:
    """Markdown: per stage, each behaviour's rate on test prompts, one value per seed (seed order), then the mean."""
    head = ["stage"] + [name for _, _, name in BEHAVIOURS]
    rows = []
    for s in stages:
        cells = [s]
        for cat, crit, _ in BEHAVIOURS:
            xs = [e["stages"][s].get("categories", {}).get(cat, {}).get(crit) for e in evals.values()]
            cells.append("–" if None in xs else " / ".join(f"{x:.2f}" for x in xs) + f" (mean {sum(xs) / len(xs):.2f})")
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the main job for several seeds, and a table across them")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--runs", default="runs", help="folder of the runs: RUNS/seed-N")
    ap.add_argument("--md", default="", help="markdown file for the table (default: RUNS/seeds-<preset>.md)")
    ap.add_argument("--config", default="", help="a TOML file passed to every run")
    args = ap.parse_args(argv)
    runs = Path(args.runs).resolve()
    evals = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = runs / f"seed-{seed}"
        alignloop("run", "--preset", args.preset, "--seed", seed, "--out", out, *(["--config", args.config] if args.config else []))
        evals[seed] = json.loads((out / "eval.json").read_text())
    table = seeds_table(evals)
    md = Path(args.md) if args.md else runs / f"seeds-{args.preset}.md"
    md.write_text(f"`experiments/seeds.py --preset {args.preset} --seeds {args.seeds}` (test prompts)\n\n{table}",
                  encoding="utf-8")
    print(f"\n{table}\nseeds: table → {md}")


if __name__ == "__main__":
    main()
