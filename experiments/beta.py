"""Does the KL penalty matter? PPO from the same SFT policy against the same reward model with β = 0
and with the default β; test gold score, reward-model score and kl_exact to SFT of each, and the dev
probe along PPO (report.html of the main run fits Gao et al.'s form to these runs' probe curves).

    python experiments/beta.py --run runs/tiny [--betas 0,0.2] [--iterations 60]

The run directory must hold world/, sft/ and round-1/reward/ (the main job makes them). Each PPO run
goes into a copy (runs/beta-<β>/) so the main run is left as it is. Results: docs/beta.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignloop.cli import run_stage  # noqa: E402
from alignloop.stats import fmt_interval  # noqa: E402
from alignloop.train.ppo import PRESETS, Config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--betas", default="", help="comma-separated; default: 0 and the preset's β")
    ap.add_argument("--iterations", type=int, default=0, help="default: the preset's (the main run's round 1)")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    run = Path(args.run)
    args.iterations = args.iterations or PRESETS[args.preset].get("iterations", Config().iterations)
    if not args.betas:
        args.betas = f"0,{PRESETS[args.preset].get('kl_coef', Config().kl_coef):g}"
    rows = []
    for beta in [float(b) for b in args.betas.split(",")]:
        out = run.parent / f"beta-{beta:g}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for sub in ("world", "tokenizer", "sft"):
            (out / sub).symlink_to((run / sub).resolve())
        shutil.copy(run / "config.toml", out / "config.toml")  # a copy: this run's [ppo] β must not be written into the main run's
        (out / "round-1").mkdir()
        (out / "round-1" / "reward").symlink_to((run / "round-1" / "reward").resolve())
        run_stage("ppo", ["--preset", args.preset, "--out", str(out), "--kl-coef", str(beta),
                          "--iterations", str(args.iterations)])
        run_stage("eval", ["--preset", args.preset, "--out", str(out), "--stage", "round-1/ppo",
                           "--model", str(out / "round-1" / "ppo"), "--reward-model", str(out / "round-1" / "reward")])
        m = json.loads((out / "eval.json").read_text())["stages"]["round-1/ppo"]
        curve = [json.loads(line) for line in (out / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
        probes = [(r["kl_sampled"], r["gold_probe"], r["rm_probe"]) for r in curve if "gold_probe" in r]
        rows.append((beta, m, probes))
    sft = json.loads((run / "eval.json").read_text())["stages"].get("sft")
    print(f"\n{'policy':<12} {'gold [95% interval]':>22} {'helpful':>8} {'truthful':>9} {'harmless':>9} {'RM score':>9} "
          f"{'kl_exact':>8} {'distinct-2':>10}")
    if sft:
        print(f"{'sft':<12} {sft['gold_score']:>6.3f} {fmt_interval(sft['ci95']['gold_score'])} {sft['helpful']:>8.2f} "
              f"{sft['truthful']:>9.2f} {sft['harmless']:>9.2f} {'':>9} {0:>8.2f} {sft['distinct_2']:>10.2f}")
    for beta, m, _ in rows:
        print(f"{'β = %g' % beta:<12} {m['gold_score']:>6.3f} {fmt_interval(m['ci95']['gold_score'])} {m['helpful']:>8.2f} "
              f"{m['truthful']:>9.2f} {m['harmless']:>9.2f} {m['rm_score']:>+9.3f} {m['kl_exact']:>8.2f} {m['distinct_2']:>10.2f}")
    for beta, _, probes in rows:
        print(f"β = {beta:g}, along PPO (kl_sampled, dev-probe gold, dev-probe RM): " +
              ", ".join(f"({k:.2f}, {g:.3f}, {r:+.3f})" for k, g, r in probes))


if __name__ == "__main__":
    main()
