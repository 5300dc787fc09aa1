"""Which settings make feedback pay more? The main job's round 1 (reward model → PPO) again from the same SFT
policy and the same rankings, once per setting, each scored on dev prompts and paired against the run's SFT.

    python experiments/round1.py --runs runs/final --seeds 0,1 \
        --settings "base=;epochs4=--ppo-epochs 4;rm8=--epochs 8 --early-stop 0.1 ->"

A setting is NAME=FLAGS or NAME=REWARD_FLAGS -> FLAGS: FLAGS are `alignloop ppo`'s own, REWARD_FLAGS
`alignloop reward`'s, each added to the run's configuration (its config.toml and preset). Without `->` PPO
learns from the run's own round-1 reward model; with it the setting trains its own from the round's
rankings first. So `base=` is the main job's round 1 again, to the last bit. Each run RUNS/seed-N must hold
world/, tokenizer/, sft/ and round-1/ (experiments/seeds.py makes them); each setting trains in
RUNS/seed-N-r1-NAME/ (those linked, the run itself untouched) and is evaluated there with the main job's
evaluation seed on `--split` (dev: tune here, report test once). The table: the reward model's accuracy
against the gold order on its held-out prompts and on the round-1 policy's own answers (the run's round-2
rankings, prompts round 1 did not rank), the policy's gold gain over SFT per seed with its 95%
interval, paired on the same prompts, and the gain per category (both: the mean over the seeds).
Resumable: a setting with a finished evaluation is not trained again, unless its NAME now has other flags.
Results: docs/LOG.md.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigger import alignloop, scored  # noqa: E402  (experiments/ is on sys.path as the script's folder)

from alignloop.evaljson import key_of  # noqa: E402
from alignloop.stats import paired_gain  # noqa: E402

CATEGORIES = ("harmful", "known_fact", "unknown_fact", "task", "multi_turn")


def parse_settings(text: str) -> list[tuple[str, list[str] | None, list[str]]]:
    """"NAME=FLAGS;NAME=REWARD_FLAGS -> FLAGS" → [(name, reward flags or None, PPO flags)]; ValueError names a
    malformed item (each NAME is a folder's name, once)."""
    out = []
    for item in text.split(";"):
        name, eq, flags = item.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in [n for n, _, _ in out]:
            raise ValueError(f"--settings: {item.strip()!r} is not NAME=FLAGS with a new NAME of letters, digits, '.', '_' or '-'")
        rm, arrow, ppo = flags.rpartition("->")
        out.append((name, shlex.split(rm) if arrow else None, shlex.split(ppo)))
    return out


def check_run(run: Path, needs_reward: bool) -> str:
    """What a finished run lacks for round 1 again ('' when nothing)."""
    for need in ("world/world.json", "sft/config.json", "round-1/rankings.jsonl",
                 *(["round-1/reward/eval.json"] if needs_reward else [])):
        if not (run / need).exists():
            return f"{run / need} is missing: run the main job first (experiments/seeds.py --runs {run.parent})"
    return ""


def setting_run(run: Path, name: str, rm_flags: list[str] | None, flags: list[str], seed: int, preset: str,
                split: str) -> tuple[dict, dict]:
    """Round 1 with these flags from RUN's SFT model and round-1 rankings, in RUN-r1-NAME/: the policy's entry
    on `split` and the reward model's eval.json (RUN's own reward model where `rm_flags` is None)."""
    out = run.parent / f"{run.name}-r1-{name}"
    path, said = out / "eval.json", out / "setting.json"
    setting = {"reward": rm_flags, "ppo": flags}
    if not ((out / "round-1" / "ppo" / "config.json").exists() and path.exists()
            and "round-1/ppo" in json.loads(path.read_text()).get(key_of(split), {})
            and said.exists() and json.loads(said.read_text()) == setting):  # a NAME used again with other flags: anew
        shutil.rmtree(out, ignore_errors=True)
        (out / "round-1").mkdir(parents=True)
        for sub in ("world", "tokenizer", "sft"):
            (out / sub).symlink_to((run / sub).resolve())
        # the run's config.toml holds each stage's table as the main job resolved it, seeds included
        settings = ["--preset", preset, "--config", run / "config.toml", "--round", 1]
        if rm_flags is None:
            (out / "round-1" / "reward").symlink_to((run / "round-1" / "reward").resolve())
        else:
            for f in (run / "round-1").glob("*.jsonl"):  # the round's samples, rankings and demonstrations
                (out / "round-1" / f.name).symlink_to(f.resolve())
            alignloop("reward", "--out", out, *settings, *rm_flags)
        alignloop("ppo", "--out", out, *settings, *flags)
        said.write_text(json.dumps(setting))
    rm = json.loads((out / "round-1" / "reward" / "eval.json").read_text())
    return scored(out, "round-1/ppo", seed, preset, split), rm


def on_policy_accuracy(run: Path, rm_dir: Path) -> float | None:
    """The reward model's accuracy against the gold order on the round-1 policy's own answers: RUN's round-2
    rankings (the main job's round-1 PPO sampled them), on the prompts round 1 did not rank; None where the
    run has no round 2. The held-out figure of `alignloop reward` scores SFT's answers, which PPO leaves."""
    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.train.pairs import read_comparisons
    from alignloop.train.reward import evaluate, gold_scores
    path = run / "round-2" / "rankings.jsonl"
    if not path.exists():
        return None
    seen = {g.prompt_id for g in read_comparisons(run / "round-1" / "rankings.jsonl")}
    groups = [g for g in read_comparisons(path) if g.prompt_id not in seen]
    tok = ChatTokenizer.load(rm_dir)
    for g in groups:  # as the reward stage renders them
        g.ids = [tok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
        g.start = len(tok.render_prompt(g.prompt))
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_scalar_model(rm_dir, trained=True).to(device)
    return evaluate(model, groups, tok.pad_id, device, gold=gold_scores(groups, run)).get("gold_accuracy")


def mean_cell(values: list[float | None]) -> str:
    """The mean over the seeds that have the figure; a dash where none has (a run without a round 2)."""
    have = [v for v in values if v is not None]
    return f"{sum(have) / len(have):.3f}" if have else "—"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="round-1 settings side by side, paired against SFT")
    ap.add_argument("--runs", default="runs", help="folder of the main-job runs: RUNS/seed-N")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--settings", required=True, help='"NAME=FLAGS;NAME=REWARD_FLAGS -> FLAGS": '
                    "`alignloop ppo` flags, after those of `alignloop reward` for a reward model of the setting's own")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--md", default="", help="markdown file for the table (default: RUNS/round1.md)")
    args = ap.parse_args(argv)
    try:
        settings, seeds = parse_settings(args.settings), [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        ap.error(str(e))
    for seed in seeds:
        if missing := check_run(Path(args.runs).resolve() / f"seed-{seed}", any(r is None for _, r, _ in settings)):
            ap.error(missing)
    rows = ["| setting | RM gold order | on the policy's answers | " + " | ".join(f"seed {s}: gain [95%]" for s in seeds) + " | mean | "
            + " | ".join(CATEGORIES) + " |", "| --- " * (len(seeds) + 4 + len(CATEGORIES)) + "|"]
    for name, rm_flags, flags in settings:
        gains, rm_acc, on_pol, per_cat = [], [], [], {c: [] for c in CATEGORIES}
        for seed in seeds:
            run = Path(args.runs).resolve() / f"seed-{seed}"
            sft = scored(run, "sft", seed, args.preset, args.split)
            pol, rm = setting_run(run, name, rm_flags, flags, seed, args.preset, args.split)
            gains.append(paired_gain(pol, sft))
            rm_acc.append(rm.get("gold_accuracy"))
            on_pol.append(on_policy_accuracy(run, run.parent / f"{run.name}-r1-{name}" / "round-1" / "reward"))
            for c in CATEGORIES:
                per_cat[c].append(pol["categories"][c]["gold_score"] - sft["categories"][c]["gold_score"])
        cells = [f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}]" for g, h, _ in gains]
        shown = " ".join(flags if rm_flags is None else [*rm_flags, "->", *flags])
        rows.append(f"| {name} `{shown}` | {mean_cell(rm_acc)} | {mean_cell(on_pol)} | "
                    + " | ".join(cells)
                    + f" | {sum(g for g, _, _ in gains) / len(gains):+.3f} | "
                    + " | ".join(f"{sum(v) / len(v):+.3f}" for v in per_cat.values()) + " |")
    table = "\n".join(rows) + "\n"
    md = Path(args.md) if args.md else Path(args.runs) / "round1.md"
    md.write_text(f"`experiments/round1.py --runs {args.runs} --seeds {args.seeds} --settings "
                  f"{shlex.quote(args.settings)} --split {args.split}` ({args.split} prompts)\n\n" + table, encoding="utf-8")
    print(f"\n{table}\nround1: table → {md}")


if __name__ == "__main__":
    main()
