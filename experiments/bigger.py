"""InstructGPT's headline in miniature: is the aligned small policy better than an SFT model ~4× its size?

    python experiments/bigger.py --runs runs --seeds 0,1,2 [--size tiny4x] [--sft-lr 1e-3] [--split dev]

For each finished main-job run RUNS/seed-N (experiments/seeds.py makes them), a model of `--size` is
pretrained on the same corpus with the same tokenizer and the run's pretraining settings, fine-tuned on the
same demonstrations with the run's SFT settings, and evaluated on the same test prompts, all in
RUN/bigger-<size>/ (its own eval.json). The table: each seed's final policy (the last
round's PPO) against that bigger SFT model, paired on the same test prompts, with the 95% interval, and the
two models' parameter counts, and the bigger SFT model against the small run's own SFT. `--sft-lr`: the
bigger model's own SFT rate (RUN/bigger-<size>-sft-lr<LR>/, from the same pretrained model), chosen with
`--split dev` (every figure on dev prompts; the runs' test results are left as they are): on seed 0 1e-3 of
2.5e-4–2e-3 (docs/benchmarks.md). Resumable: finished steps are skipped.
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

from alignloop.evaljson import key_of  # noqa: E402
from alignloop.stats import paired_gain  # noqa: E402


def alignloop(*args) -> None:
    cmd = [sys.executable, "-m", "alignloop", *map(str, args)]
    print(f"{Path(sys.argv[0]).stem}:", " ".join(cmd[1:]), flush=True)  # the experiment's own name (seeds, round1, …)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc == 2:  # bad input: alignloop named the file, line or flag above; no traceback of ours under it
        sys.exit(2)
    if rc != 0:
        sys.exit(f"{Path(sys.argv[0]).stem}: `alignloop {args[0]}` stopped with exit code {rc}; its output is above")


def n_params(folder: Path) -> int:
    from alignloop.model import load_causal_lm, n_params as count
    return count(load_causal_lm(folder), False)


def bigger_sft(run: Path, size: str, seed: int, preset: str, sft_lr: float = 0.0, split: str = "test") -> dict:
    """Pretrain and fine-tune a `size` model as the run's own were (the run's config.toml: its [pretrain] and
    [sft] tables, seeds included; the size alone differs), in RUN/bigger-<size>/ with a copy of the run's
    world, and evaluate it there on `split`'s prompts with the main job's evaluation seed. `sft_lr`: the
    bigger model's own SFT learning rate (0: the run's), fine-tuned in RUN/bigger-<size>-sft-lr<lr>/ from the
    same pretrained model. Its eval.json entry."""
    big = run / f"bigger-{size}"
    out = big if not sft_lr else run / f"bigger-{size}-sft-lr{sft_lr:g}"
    for d in {big, out}:
        d.mkdir(exist_ok=True)
        if not (d / "world" / "world.json").exists():  # its own copy: eval and sft read RUN/world by default
            shutil.copytree(run / "world", d / "world")
    settings = ["--preset", preset, "--config", run / "config.toml"]
    if not (big / "pretrain" / "config.json").exists():
        alignloop("pretrain", "--out", big, *settings, "--size", size, "--tokenizer", run / "tokenizer", "--resume")
    if not (out / "sft" / "config.json").exists():
        alignloop("sft", "--out", out, *settings, "--resume",
                  *(["--init", big / "pretrain", "--lr", sft_lr] if sft_lr else []))
    return scored(out, "sft", seed, preset, split)


def scored(run: Path, stage: str, seed: int, preset: str, split: str) -> dict:
    """A stage's eval.json entry on `split`, evaluated first where the run has none (a main-job run has test
    results only) with the main job's evaluation seed: the stage's own plus the run's (alignloop/pipeline.py)."""
    from alignloop.evaluate import Config as EvalConfig
    path, key = run / "eval.json", key_of(split)
    if stage not in (json.loads(path.read_text()) if path.exists() else {}).get(key, {}):
        alignloop("eval", "--out", run, "--preset", preset, "--stage", stage, "--seed", EvalConfig().seed + seed,
                  "--split", split)
    return json.loads(path.read_text())[key][stage]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the final small policy against a bigger SFT model, paired on test")
    ap.add_argument("--runs", default="runs", help="folder of the main-job runs: RUNS/seed-N")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", default="tiny4x", help="the bigger model's size preset (alignloop/model.py SIZES)")
    ap.add_argument("--preset", default="tiny", help="the runs' preset")
    ap.add_argument("--sft-lr", type=float, default=0.0, help="the bigger model's own SFT learning rate (0: the "
                    "run's; chosen on dev: docs/benchmarks.md)")
    ap.add_argument("--split", default="test", choices=("test", "dev"),
                    help="the prompts to score on (dev: for choosing --sft-lr; the runs' own policies need dev results too)")
    ap.add_argument("--md", default="", help="markdown file for the table (default: RUNS/bigger-<size>.md)")
    args = ap.parse_args(argv)
    rows = ["| seed | final policy | its gold | its SFT's gold | parameters | bigger SFT gold | parameters | "
            "final − bigger SFT [95%] | bigger SFT − its SFT [95%] |", "| --- " * 9 + "|"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = Path(args.runs).resolve() / f"seed-{seed}"
        bigger = bigger_sft(run, args.size, seed, args.preset, args.sft_lr, args.split)
        names = json.loads((run / "eval.json").read_text())["stages"]  # (the main job's stages, on test)
        final = max((s for s in names if s.startswith("round-") and s.endswith("/ppo")), key=lambda s: int(s[6:-4]))
        pol, sft = (scored(run, st, seed, args.preset, args.split) for st in (final, "sft"))
        g, h, n = paired_gain(pol, bigger)
        d, e, _ = paired_gain(bigger, sft)
        rows.append(f"| {seed} | {final} | {pol['gold_score']:.3f} | {sft['gold_score']:.3f} | "
                    f"{n_params(run / final) / 1e6:.2f}M | {bigger['gold_score']:.3f} | "
                    f"{n_params(run / f'bigger-{args.size}' / 'pretrain') / 1e6:.2f}M | "
                    f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}] (n {n}) | {d:+.3f} [{d - e:+.3f}, {d + e:+.3f}] |")
    table = "\n".join(rows) + "\n"
    md = Path(args.md) if args.md else Path(args.runs) / f"bigger-{args.size}.md"
    md.write_text(f"`experiments/bigger.py --runs {args.runs} --seeds {args.seeds} --size {args.size} --sft-lr "
                  f"{args.sft_lr:g} --split {args.split}` ({args.split} prompts)\n\n"
                  + table, encoding="utf-8")
    print(f"\n{table}\nbigger: table → {md}")


if __name__ == "__main__":
    main()
