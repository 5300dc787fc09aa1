"""Demonstrations against comparisons for the same labelers' time: which mix gives the most gold?

    python experiments/budget.py --run runs/dev0 --config dev.toml [--demos 75] [--prompts 400]

RUN is a finished main-job run (best on dev prompts: `[eval] split = "dev"` in the TOML given to both); its
pretrained model is reused. Each arm is a run folder RUN/budget/<arm> with RUN's world, tokenizer and
pretrained model, where SFT and one round of sample → rank → reward → PPO are redone from scratch:

- **fewer demonstrations**: SFT on a seeded random `--demos` of the world's demonstrations, the full round 1;
- **fewer comparisons**: all demonstrations, round 1 sampled for `--prompts` prompts instead of the preset's;
- **both full** is RUN itself (its round 1).

A labeler's time is not simulated: the table gives each arm's demonstrations and ranked prompts, and the
cost of one demonstration in rankings at which the two cut arms cost the same (the labeling app stores
each task's time on task: `alignloop label export` has them for a real team). Gold is the dev gold of
round-1 PPO, and of SFT alone, paired on the same dev prompts.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigger import alignloop  # noqa: E402  (one way to run a stage: its exit code, not a traceback)

from alignloop.stats import paired_gain  # noqa: E402


def arm(run: Path, dest: Path, config: str, preset: str, demos: int | None, prompts: int | None) -> Path:
    """RUN's world, tokenizer and pretrained model in DEST; SFT and round 1 run there."""
    for name in ("world", "tokenizer", "pretrain"):
        if not (dest / name).exists():
            shutil.copytree(run / name, dest / name, ignore=shutil.ignore_patterns("checkpoints"))
    if demos is not None and not (dest / "sft" / "config.json").exists():
        path = dest / "world" / "demonstrations.jsonl"
        lines = [x for x in (run / "world" / "demonstrations.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        path.write_text("".join(x + "\n" for x in sorted(random.Random(0).sample(lines, demos), key=lines.index)),
                        encoding="utf-8")
    if not (dest / "eval.json").exists():  # the base model's figures are RUN's
        data = json.loads((run / "eval.json").read_text())
        keep = {k: v for k, v in data.items() if k in ("fact_recall",)}
        for key in ("stages", "stages_dev"):
            if key in data:
                keep[key] = {s: m for s, m in data[key].items() if s == "base"}
        (dest / "eval.json").write_text(json.dumps(keep), encoding="utf-8")
    toml = dest / "arm.toml"
    toml.write_text(Path(config).read_text(encoding="utf-8") + (f"\n[sample]\nn_prompts = {prompts}\n" if prompts else ""),
                    encoding="utf-8")
    alignloop("run", "--preset", preset, "--config", toml, "--out", dest, "--rounds", 1)
    return dest


def counts(folder: Path) -> tuple[int, int]:
    demos = sum(1 for x in (folder / "world" / "demonstrations.jsonl").read_text().splitlines() if x.strip())
    ranked = len({json.loads(x)["prompt_id"] for x in (folder / "round-1" / "rankings.jsonl").read_text().splitlines() if x.strip()})
    return demos, ranked


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="demonstrations against comparisons at the same labeling budget")
    ap.add_argument("--run", required=True, help="a finished main-job run (dev prompts)")
    ap.add_argument("--config", required=True, help="the TOML the run was made with (e.g. [eval] split = \"dev\")")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--demos", type=int, default=75, help="demonstrations in the 'fewer demonstrations' arm")
    ap.add_argument("--prompts", type=int, default=400, help="prompts sampled for ranking in the 'fewer comparisons' arm")
    args = ap.parse_args(argv)
    run = Path(args.run).resolve()
    arms = {"both full": run,
            "fewer demonstrations": arm(run, run / "budget" / "demos", args.config, args.preset, args.demos, None),
            "fewer comparisons": arm(run, run / "budget" / "comparisons", args.config, args.preset, None, args.prompts)}
    rows = ["| arm | demonstrations | prompts ranked | SFT dev gold | round-1 PPO dev gold | PPO − SFT [95%] |",
            "| --- | --- | --- | --- | --- | --- |"]
    final = {}
    for name, folder in arms.items():
        st = json.loads((folder / "eval.json").read_text())["stages_dev"]
        d, r = counts(folder)
        g, h, _ = paired_gain(st["round-1/ppo"], st["sft"])
        final[name] = (st["round-1/ppo"], d, r)
        rows.append(f"| {name} | {d} | {r} | {st['sft']['gold_score']:.3f} | {st['round-1/ppo']['gold_score']:.3f} | "
                    f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}] |")
    (a, da, _), (b, _, rb) = final["fewer demonstrations"], final["fewer comparisons"]
    g, h, n = paired_gain(a, b)
    full_d, full_r = final["both full"][1:]
    ratio = (full_r - rb) / (full_d - da) if full_d != da else float("nan")
    table = ("\n".join(rows) + f"\n\nfewer demonstrations − fewer comparisons, round-1 PPO on the same {n} dev prompts: "
             f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}]; the two cost the same when one demonstration costs as much "
             f"as ranking {ratio:.1f} prompts' answers ({full_d - da} demonstrations against {full_r - rb} rankings dropped)\n")
    md = run / "budget" / "table.md"
    md.write_text(f"`python experiments/budget.py --run {args.run} --config {args.config} --demos {args.demos} "
                  f"--prompts {args.prompts}`\n\n" + table, encoding="utf-8")
    print(f"\n{table}\nbudget: table → {md}")


if __name__ == "__main__":
    main()
