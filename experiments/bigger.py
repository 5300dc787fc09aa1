"""InstructGPT's headline in miniature: is the aligned small policy better than an SFT model ~4× its size?

    python experiments/bigger.py --runs runs --seeds 0,1,2 [--size tiny4x]

For each finished main-job run RUNS/seed-N (experiments/seeds.py makes them), a model of `--size` is
pretrained on the same corpus with the same tokenizer and the run's pretraining settings, fine-tuned on the
same demonstrations with the run's SFT settings, and evaluated on the same test prompts, all in
RUN/bigger-<size>/ (its own eval.json: the run's own is left as it is). The table: each seed's final policy (the last
round's PPO) against that bigger SFT model, paired on the same test prompts, with the 95% interval, and the
two models' parameter counts. Resumable: finished steps are skipped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignloop.stats import paired_gain  # noqa: E402


def alignloop(*args) -> None:
    cmd = [sys.executable, "-m", "alignloop", *map(str, args)]
    print("bigger:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def n_params(folder: Path) -> int:
    from alignloop.model import load_causal_lm, n_params as count
    return count(load_causal_lm(folder), False)


def bigger_sft(run: Path, size: str, seed: int, preset: str) -> dict:
    """Pretrain and fine-tune a `size` model as the run's own were (the run's config.toml: its [pretrain] and
    [sft] tables, seeds included; the size alone differs), in RUN/bigger-<size>/ with a copy of the run's
    world, and evaluate it there on the test prompts with the main job's evaluation seed. Its eval.json entry."""
    from alignloop.evaluate import Config as EvalConfig
    big = run / f"bigger-{size}"
    big.mkdir(exist_ok=True)
    if not (big / "world" / "world.json").exists():  # its own copy: eval and sft read RUN/world by default
        shutil.copytree(run / "world", big / "world")
    settings = ["--preset", preset, "--config", run / "config.toml"]
    if not (big / "pretrain" / "config.json").exists():
        alignloop("pretrain", "--out", big, *settings, "--size", size, "--tokenizer", run / "tokenizer", "--resume")
    if not (big / "sft" / "config.json").exists():
        alignloop("sft", "--out", big, *settings, "--resume")
    if "sft" not in json.loads((big / "eval.json").read_text() if (big / "eval.json").exists() else "{}").get("stages", {}):
        # the main job's evaluation seed: the stage's own plus the run's seed (alignloop/pipeline.py)
        alignloop("eval", "--out", big, "--preset", preset, "--stage", "sft", "--seed", EvalConfig().seed + seed)
    return json.loads((big / "eval.json").read_text())["stages"]["sft"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the final small policy against a bigger SFT model, paired on test")
    ap.add_argument("--runs", default="runs", help="folder of the main-job runs: RUNS/seed-N")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", default="tiny4x", help="the bigger model's size preset (alignloop/model.py SIZES)")
    ap.add_argument("--preset", default="tiny", help="the runs' preset")
    ap.add_argument("--md", default="", help="markdown file for the table (default: RUNS/bigger-<size>.md)")
    args = ap.parse_args(argv)
    rows = ["| seed | final policy | its gold | parameters | bigger SFT gold | parameters | final − bigger SFT [95%] |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = Path(args.runs).resolve() / f"seed-{seed}"
        bigger = bigger_sft(run, args.size, seed, args.preset)
        stages = json.loads((run / "eval.json").read_text())["stages"]
        final = max((s for s in stages if s.startswith("round-") and s.endswith("/ppo")), key=lambda s: int(s[6:-4]))
        g, h, n = paired_gain(stages[final], bigger)
        rows.append(f"| {seed} | {final} | {stages[final]['gold_score']:.3f} | {n_params(run / final) / 1e6:.2f}M | "
                    f"{bigger['gold_score']:.3f} | {n_params(run / f'bigger-{args.size}' / 'sft') / 1e6:.2f}M | "
                    f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}] (n {n}) |")
    table = "\n".join(rows) + "\n"
    md = Path(args.md) if args.md else Path(args.runs) / f"bigger-{args.size}.md"
    md.write_text(f"`experiments/bigger.py --runs {args.runs} --seeds {args.seeds} --size {args.size}` (test prompts)\n\n"
                  + table, encoding="utf-8")
    print(f"\n{table}\nbigger: table → {md}")


if __name__ == "__main__":
    main()
