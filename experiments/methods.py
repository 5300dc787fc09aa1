"""Beyond PPO, measured against gold: PPO, DPO, RLOO and best-of-n from one run's SFT model, its round-1
rankings and its round-1 reward model, each at several strengths (β for the three trained methods, N for
best-of-n), each evaluated on the test prompts.

    python experiments/methods.py --run runs/tiny [--out runs/methods] [--preset tiny]
        [--ppo-betas 0.05,0.2,0.5] [--rloo-betas 0.05,0.2,0.5] [--dpo-betas 0.05,0.1,0.5] [--best-of 4,16,64]

The run directory must hold world/, tokenizer/, sft/ and round-1/ with rankings.jsonl and reward/ (the main
job makes them). Each method and strength trains in its own folder OUT/<method>-<strength>/, whose world,
tokenizer, sft and round-1 inputs are links to the run's (the run itself is left as it is), and every
command runs as its own process so that its wall time and peak memory (the child's maximum resident set,
or its GPU peak as the stage reports it) are its own. A finished point (OUT/<name>/result.json) is
skipped when the script runs again, so an interrupted comparison continues.

Per point: gold score with its 95% interval, helpful / truthful / harmless rates, the round-1 reward
model's score (the proxy every method optimised or picked with), KL to SFT per answer (kl_exact; best-of-n:
the analytic log N − (N−1)/N, marked ≤), distinct-2, the method's wall time (training; for best-of-n the
sampling of N answers and scoring them, which is its whole cost) and its peak memory. Written to
OUT/methods.md (a markdown table), OUT/methods.json and OUT/gold-vs-sqrt-kl.png (gold against √KL, the
axis of Gao et al.'s fit, with SFT at 0).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignloop.stats import fmt_interval, mean_sd, paired_gain  # noqa: E402
from alignloop.report import dev_choice, methods_plot, methods_verdict  # noqa: E402

INPUTS = ("world", "tokenizer", "sft")
ROUND_INPUTS = ("rankings.jsonl", "pairs.jsonl", "reward")


def alignloop(*args) -> tuple[float, float]:
    """Run `python -m alignloop ARGS` as a child process: (wall seconds, peak resident set in GB). Its
    output goes through; a failure stops the comparison."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", *map(str, args)], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix them)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"alignloop {' '.join(map(str, args))} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20  # KiB on Linux


def point_dir(run: Path, out: Path, name: str) -> Path:
    """A fresh folder for one point, its inputs linked to the run's; the run's config.toml copied (so the
    stages read the same settings, and writing [ppo]/[dpo]/[rloo] there never touches the run)."""
    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    (d / "round-1").mkdir(parents=True)
    for sub in INPUTS:
        (d / sub).symlink_to((run / sub).resolve())
    for sub in ROUND_INPUTS:
        if (run / "round-1" / sub).exists():
            (d / "round-1" / sub).symlink_to((run / "round-1" / sub).resolve())
    if (run / "config.toml").exists():
        shutil.copy(run / "config.toml", d / "config.toml")
    return d


def evaluate(d: Path, stage: str, model: Path, rm: Path, preset: str, extra=()) -> tuple[dict, float, float, dict]:
    """Test figures (what is reported), their wall time and peak, and the dev figures (what picks a
    method's strength: a strength chosen by its test score would be tuned on test)."""
    secs, peak = alignloop("eval", "--preset", preset, "--out", d, "--stage", stage, "--model", model,
                           "--reward-model", rm, *extra)
    alignloop("eval", "--preset", preset, "--out", d, "--stage", stage, "--model", model,
              "--reward-model", rm, "--split", "dev", *extra)
    name = stage if not extra else f"bo{extra[1]}"
    ev = json.loads((d / "eval.json").read_text())
    return ev["stages"][name], secs, peak, ev["stages_dev"][name]


def run_point(run: Path, out: Path, method: str, strength: float, preset: str, iterations: int) -> dict:
    name = f"{method}-{strength:g}"
    done = out / name / "result.json"
    if done.exists():
        print(f"methods: {name} already done, skipped")
        return json.loads(done.read_text())
    d = point_dir(run, out, name)
    rm = d / "round-1" / "reward"
    more = ["--iterations", iterations] if iterations and method in ("ppo", "rloo") else []
    if method == "sft":
        m, secs, peak, dev = evaluate(d, "sft", d / "sft", rm, preset)
        train = None
    elif method == "bo":
        m, secs, peak, dev = evaluate(d, "sft", d / "sft", rm, preset, ("--best-of", int(strength)))
        train = {"seconds": secs, "peak_gb": peak}
    else:
        if method == "dpo":
            secs, peak = alignloop("dpo", "--preset", preset, "--out", d, "--beta", strength)
        else:
            secs, peak = alignloop("ppo", "--preset", preset, "--out", d, "--algo", method, "--kl-coef", strength, *more)
        # the stage's own figure where it records one: the GPU allocator's peak on CUDA (the child's resident
        # set counts none of it), its resident set on the CPU (the same number as the child's)
        train = {"seconds": secs, "peak_gb": _stage_peak(d / "round-1" / method) or peak}
        m, _, _, dev = evaluate(d, f"round-1/{method}", d / "round-1" / method, rm, preset)
    kl = m.get("kl_exact")
    result = {"method": method, "strength": strength, "stage": "sft" if method == "sft" else
              f"bo{int(strength)}" if method == "bo" else f"round-1/{method}", "gold": m["gold_score"], "gold_ci": m["ci95"]["gold_score"],
              "helpful": m["helpful"], "truthful": m["truthful"], "harmless": m["harmless"], "rm_score": m["rm_score"],
              "kl": 0.0 if method == "sft" else m.get("kl_bound") if method == "bo" else kl,
              "kl_is_bound": method == "bo", "distinct_2": m["distinct_2"], "train": train,
              "mean_length": m.get("mean_length"), "dev_gold": dev["gold_score"], "dev_gold_ci": dev["ci95"]["gold_score"],
              "dev_kl": 0.0 if method == "sft" else dev.get("kl_bound") if method == "bo" else dev.get("kl_exact")}
    done.write_text(json.dumps(result, indent=1))
    return result


def _stage_peak(stage: Path) -> float | None:
    """The peak memory a training stage recorded itself (dpo: eval.json; ppo/rloo: metrics.jsonl)."""
    if (stage / "eval.json").exists():
        return json.loads((stage / "eval.json").read_text()).get("peak_memory_gb")
    if (stage / "metrics.jsonl").exists():
        peaks = [json.loads(x).get("peak_memory_gb") for x in (stage / "metrics.jsonl").read_text().splitlines() if x]
        peaks = [p for p in peaks if p is not None]
        return max(peaks) if peaks else None
    return None


def with_gains(out: Path, rows: list[dict]) -> list[dict]:
    """Each point's paired gold gain over SFT on the same test prompts (from the points' eval.json files:
    the per-prompt scores), with its 95% half-width."""
    sft = json.loads((out / "sft-0" / "eval.json").read_text())["stages"]["sft"]
    for r in rows:
        if r["method"] != "sft":
            stage = r.get("stage") or (f"bo{int(r['strength'])}" if r["method"] == "bo" else f"round-1/{r['method']}")
            m = json.loads((out / f"{r['method']}-{r['strength']:g}" / "eval.json").read_text())["stages"][stage]
            r["gain"], r["gain_half"], _ = paired_gain(m, sft)
    return rows


LABEL = {"sft": "SFT", "ppo": "PPO", "rloo": "RLOO", "dpo": "DPO", "bo": "best-of-N"}


def table(rows: list[dict]) -> str:
    chosen = {id(r) for r in dev_choice(rows).values()}
    head = ("| method | strength | gold [95% interval] | gain over SFT [95%] | dev gold | helpful | truthful | harmless "
            "| RM score | KL to SFT (nats) | distinct-2 | wall time (s) | peak memory (GB) |\n|" + " --- |" * 13)
    lines = [head]
    for r in rows:
        t = r["train"] or {}
        kl = "0" if r["method"] == "sft" else ("≤ " if r["kl_is_bound"] else "") + f"{r['kl']:.3f}"
        strength = "" if r["method"] == "sft" else f"N = {r['strength']:g}" if r["method"] == "bo" else f"{r['strength']:g}"
        gain = "" if r.get("gain") is None else f"{r['gain']:+.3f} [{r['gain'] - r['gain_half']:+.3f}, {r['gain'] + r['gain_half']:+.3f}]"
        peak = t.get("peak_gb")
        secs = "-" if not t else f"{t['seconds']:.0f}"
        lines.append(f"| {LABEL[r['method']]} | {strength}{' ★' if id(r) in chosen else ''} | {r['gold']:.3f} "
                     f"{fmt_interval(r['gold_ci'])} | {gain} | {r['dev_gold']:.3f} | "
                     f"{r['helpful']:.2f} | {r['truthful']:.2f} | {r['harmless']:.2f} | {r['rm_score']:+.3f} | {kl} | "
                     f"{r['distinct_2']:.2f} | {secs} | {'-' if peak is None else f'{peak:.2f}'} |")
    return "\n".join(lines) + "\n"


def figure(seeds: list[list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    methods_plot(ax, seeds)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt_mean_sd(xs: list[float]) -> str:
    m, sd = mean_sd(xs)
    return f"{m:+.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def summary(runs: list[Path]) -> str:
    """Across seeds (each RUN/methods/methods.json): per method and strength the paired gain over SFT in
    every seed, its mean ± sd, the mean KL; then per method the strength chosen on dev in each seed and
    that choice's test gain — the figure to quote — with the seeds whose interval lies above 0."""
    seeds = {run: json.loads((run / "methods" / "methods.json").read_text()) for run in runs}
    keys = sorted({(r["method"], r["strength"]) for rows in seeds.values() for r in rows if r["method"] != "sft"},
                  key=lambda k: (list(LABEL).index(k[0]), k[1]))
    lines = ["| method | strength | " + " | ".join(f"gain, {run.name}" for run in runs) + " | mean ± sd | mean KL |",
             "|" + " --- |" * (len(runs) + 4)]
    for method, st in keys:
        got = {run: next((r for r in rows if (r["method"], r["strength"]) == (method, st)), None) for run, rows in seeds.items()}
        cells = [f"{r['gain']:+.3f} [{r['gain'] - r['gain_half']:+.3f}, {r['gain'] + r['gain_half']:+.3f}]" if r else "–"
                 for r in got.values()]
        have = [r for r in got.values() if r]
        lines.append(f"| {LABEL[method]} | {'N = ' if method == 'bo' else 'β = '}{st:g} | " + " | ".join(cells)
                     + f" | {fmt_mean_sd([r['gain'] for r in have])} | {sum(r['kl'] for r in have) / len(have):.2f} |")
    lines += ["", "| method | strength chosen on dev, per seed | its test gain, per seed | mean ± sd | seeds with the interval above 0 |",
              "|" + " --- |" * 5]
    for method in [m for m in LABEL if m != "sft"]:
        picks = [dev_choice(rows).get(method) for rows in seeds.values()]
        if not all(picks):
            continue
        lines.append(f"| {LABEL[method]} | {', '.join(format(p['strength'], 'g') for p in picks)} | "
                     + ", ".join(f"{p['gain']:+.3f}" for p in picks) + f" | {fmt_mean_sd([p['gain'] for p in picks])} | "
                     f"{sum(p['gain'] - p['gain_half'] > 0 for p in picks)} of {len(picks)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--out", default="", help="default: <run>/methods (where report.html finds it)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--ppo-betas", default="0.05,0.2,0.5")
    ap.add_argument("--rloo-betas", default="0.05,0.2,0.5")
    ap.add_argument("--dpo-betas", default="0.05,0.1,0.5")
    ap.add_argument("--best-of", default="4,16,64")
    ap.add_argument("--iterations", type=int, default=0, help="PPO and RLOO iterations (default: the preset's)")
    ap.add_argument("--summary", default="", help="runs done before, comma-separated (their <run>/methods/): print "
                    "and write the table across them (seeds) and the figure, and train nothing")
    args = ap.parse_args()
    if args.summary:
        runs = [Path(r.strip()) for r in args.summary.split(",") if r.strip()]
        for run in runs:
            if not (run / "methods" / "methods.json").exists():
                raise SystemExit(f"methods: {run / 'methods' / 'methods.json'} is missing (run this script on {run} first)")
        text = summary(runs)
        out = Path(args.out) if args.out else runs[0].parent / "methods-seeds"
        out.mkdir(parents=True, exist_ok=True)
        (out / "methods-seeds.md").write_text(text)
        figure([json.loads((run / "methods" / "methods.json").read_text()) for run in runs], out / "gold-vs-sqrt-kl.png")
        print(text + f"\nmethods: {out / 'methods-seeds.md'}, {out / 'gold-vs-sqrt-kl.png'}")
        return
    run = Path(args.run)
    for need in ("world/world.json", "sft/config.json", "round-1/rankings.jsonl", "round-1/reward/config.json"):
        if not (run / need).exists():
            raise SystemExit(f"methods: {run / need} is missing (the main job makes it)")
    out = Path(args.out) if args.out else run / "methods"
    out.mkdir(parents=True, exist_ok=True)
    points = [("sft", 0.0)]
    for method, values in (("ppo", args.ppo_betas), ("rloo", args.rloo_betas), ("dpo", args.dpo_betas),
                           ("bo", args.best_of)):
        points += [(method, float(v)) for v in values.split(",") if v.strip()]
    t0 = time.perf_counter()
    rows = with_gains(out, [run_point(run, out, m, s, args.preset, args.iterations) for m, s in points])
    (out / "methods.json").write_text(json.dumps(rows, indent=1))
    text = (f"# Methods from {run}'s SFT model, round-1 rankings and reward model (preset {args.preset})\n\n"
            + table(rows) + "\n★: the strength whose dev gold is highest (the one to quote; the best test figure over a "
            "sweep is optimistic). Gain: paired over SFT on the same test prompts. KL: kl_exact on the test answers; "
            "best-of-N: the analytic log N − (N−1)/N (≤). Wall time: the method's own process (training; best-of-N: "
            "sampling N answers and scoring them). Peak memory: as the training stage records it (CPU: the process's "
            "maximum resident set; CUDA: the allocator's peak); best-of-N: the evaluation process's maximum resident "
            f"set. This script's whole wall time (every point, test and dev evaluation included): "
            f"{(time.perf_counter() - t0) / 60:.1f} min (points already done are only read).\n\n"
            + "".join(f"- {n}\n" for n in methods_verdict(rows)) + "\n![gold against √KL](gold-vs-sqrt-kl.png)\n")
    (out / "methods.md").write_text(text)
    figure([rows], out / "gold-vs-sqrt-kl.png")
    if (run / "config.toml").exists():  # the run's report gains its "beyond PPO" section
        subprocess.run([sys.executable, "-m", "alignloop", "report", str(run)], cwd=ROOT, check=False)
    print(text)
    print(f"methods: {out / 'methods.md'}, {out / 'gold-vs-sqrt-kl.png'}")


if __name__ == "__main__":
    main()
