"""Spend the labelers' time where it counts: active selection of prompts against random, at equal comparisons.

    python experiments/active.py --run runs/dev0 --config dev.toml [--fraction 0.5] [--members 3]

RUN is a finished two-round main-job run (best on dev prompts: `[eval] split = "dev"` in the TOML given
to both). Round 2's fresh samples were all ranked; here the labelers are given only `--fraction` of its
training comparisons, chosen two ways, and round 2 is redone from the same round-1 policy for each:

- **random**: prompts in a seeded random order until the comparisons reach the budget;
- **active**: the prompts where an ensemble of round-1 reward models disagrees most. `--members` reward
  models are trained, each with its own seed, on its own random 80% of round 1's training prompts (the
  held-out ones kept, so each reports its accuracy on the same pairs); a prompt's
  disagreement is the mean over its answer pairs of the members' spread (std) of P(answer i ≻ answer j)
  = σ(r_i − r_j). Disagreement among models trained on different data is the part of the uncertainty
  that more labels can remove; a single model's own uncertainty would pick prompts whose answers are
  equally good, where a ranking is noise.

Both arms keep round 2's held-out prompts (ranked by two labelers), so their reward models are judged on
the same pairs against the gold order. Each arm is a run folder RUN/active/<arm> (world, SFT and round 1
copied; `alignloop run --rounds 2` then does round 2's reward model, PPO and evaluation). The table: the
comparisons each arm used, its reward model's accuracy against the gold order [Wilson 95%], round-2
PPO's dev gold and its gain over round-1 PPO per 1,000 comparisons, and active − random paired on the
same dev prompts. Resumable: finished steps are skipped.
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

from alignloop.stats import paired_gain, wilson_interval  # noqa: E402


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def write(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def n_comparisons(rec: dict) -> int:
    k = len(rec.get("ranking", [])) or 2
    return k * (k - 1) // 2


def base_copy(run: Path, dest: Path, rounds: tuple[str, ...]) -> None:
    """World, tokenizer, pretrained and SFT models, config and the named round folders of RUN, into DEST
    (checkpoints left out); eval.json without the stages of later rounds, so they are run again."""
    keep = ("round-1/ppo",) if "round-1" in rounds else ()
    for name in ("world", "tokenizer", "pretrain", "sft", *rounds):
        if not (dest / name).exists():
            shutil.copytree(run / name, dest / name, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(run / "config.toml", dest / "config.toml")
    data = json.loads((run / "eval.json").read_text())
    for key in ("stages", "stages_dev"):
        if key in data:
            data[key] = {s: m for s, m in data[key].items() if not s.startswith("round-") or s in keep}
    data["reward_model"] = {r: m for r, m in data.get("reward_model", {}).items() if r in rounds}
    if not (dest / "eval.json").exists():
        (dest / "eval.json").write_text(json.dumps(data), encoding="utf-8")


def ensemble(run: Path, out: Path, members: int, preset: str, config: str) -> list[Path]:
    """`members` round-1 reward models, each on a seeded 80% of round 1's training prompts."""
    r1 = records(run / "round-1" / "rankings.jsonl")
    train_ids = sorted({r["prompt_id"] for r in r1 if r.get("split") != "heldout"})
    paths = []
    for m in range(members):
        dest = out / f"member-{m}"
        keep = set(random.Random(1000 + m).sample(train_ids, int(0.8 * len(train_ids))))
        base_copy(run, dest, ())
        write(dest / "round-1" / "rankings.jsonl", [r for r in r1 if r.get("split") == "heldout" or r["prompt_id"] in keep])
        if not (dest / "round-1" / "reward" / "config.json").exists():
            alignloop("reward", "--preset", preset, "--config", config, "--out", dest, "--round", 1, "--seed", m)
        paths.append(dest / "round-1" / "reward")
    return paths


def disagreement(members: list[Path], recs: list[dict]) -> list[float]:
    """Per ranking record: the mean over its answer pairs of the members' std of σ(r_i − r_j)."""
    import torch
    from alignloop.scoring import RewardScorer
    scores = []
    for path in members:
        scorer = RewardScorer(path, "cpu")
        flat = scorer.score_texts([r["prompt"] for r in recs for _ in r["completions"]],
                                  [c for r in recs for c in r["completions"]])
        scores.append(flat)
    s = torch.tensor(scores)  # (members, answers)
    out, o = [], 0
    for r in recs:
        k = len(r["completions"])
        block = s[:, o:o + k]
        o += k
        i, j = torch.triu_indices(k, k, 1)
        p = torch.sigmoid(block[:, i] - block[:, j])  # (members, pairs)
        out.append(p.std(0).mean().item() if p.shape[1] else 0.0)
    return out


def arm(run: Path, out: Path, name: str, chosen: set[str], preset: str, config: str) -> Path:
    """RUN's round 1 and round 2's samples, with round 2's training rankings cut to the `chosen` prompts."""
    dest = out / name
    base_copy(run, dest, ("round-1",))
    r2 = run / "round-2"
    shutil.copy(r2 / "samples.jsonl", dest / "samples.tmp")
    (dest / "round-2").mkdir(exist_ok=True)
    (dest / "samples.tmp").replace(dest / "round-2" / "samples.jsonl")
    write(dest / "round-2" / "rankings.jsonl", [r for r in records(r2 / "rankings.jsonl")
                                                 if r.get("split") == "heldout" or r["prompt_id"] in chosen])
    texts = {json.dumps(r["prompt"]) for r in records(dest / "round-2" / "rankings.jsonl")}
    write(dest / "round-2" / "pairs.jsonl", [p for p in records(r2 / "pairs.jsonl") if json.dumps(p["prompt"]) in texts])
    alignloop("run", "--preset", preset, "--config", config, "--out", dest, "--rounds", 2)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="active selection of prompts for the labelers against random, at equal comparisons")
    ap.add_argument("--run", required=True, help="a finished two-round run (dev prompts)")
    ap.add_argument("--config", required=True, help="the TOML the run was made with (e.g. [eval] split = \"dev\")")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of round 2's training comparisons given to the labelers")
    ap.add_argument("--members", type=int, default=3, help="round-1 reward models in the ensemble")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random arm's order")
    args = ap.parse_args(argv)
    run = Path(args.run).resolve()
    out = run / "active"
    r2 = [r for r in records(run / "round-2" / "rankings.jsonl") if r.get("split") != "heldout"]
    budget = args.fraction * sum(map(n_comparisons, r2))

    def take(order: list[dict]) -> tuple[set[str], int]:
        chosen, n = set(), 0
        for r in order:
            if n >= budget:
                break
            chosen.add(r["prompt_id"])
            n += n_comparisons(r)
        return chosen, n

    members = ensemble(run, out, args.members, args.preset, args.config)
    d = disagreement(members, r2)
    active, n_active = take([r for _, r in sorted(zip(d, r2), key=lambda x: -x[0])])
    order = list(r2)
    random.Random(args.seed).shuffle(order)
    rand, n_random = take(order)
    print(f"active: budget {budget:.0f} of {sum(map(n_comparisons, r2))} round-2 comparisons; active {n_active} "
          f"({len(active)} prompts), random {n_random} ({len(rand)} prompts)")
    arms = {"random": (arm(run, out, "random", rand, args.preset, args.config), n_random),
            "active": (arm(run, out, "active", active, args.preset, args.config), n_active),
            "all": (run, sum(map(n_comparisons, r2)))}
    rows = ["| round-2 labels | comparisons | RM vs gold order [95%] | round-2 PPO dev gold | gain over round-1 PPO [95%] "
            "| gain per 1,000 comparisons |", "| --- | --- | --- | --- | --- | --- |"]
    ev = {}
    for name, (folder, n) in arms.items():
        data = json.loads((folder / "eval.json").read_text())
        st, rm = data["stages_dev"], data["reward_model"]["round-2"]
        ev[name] = st["round-2/ppo"]
        k = round(rm["gold_accuracy"] * rm["n_gold_pairs"])
        lo, hi = wilson_interval(k, rm["n_gold_pairs"])
        g, h, _ = paired_gain(st["round-2/ppo"], st["round-1/ppo"])
        rows.append(f"| {name} | {n} | {rm['gold_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {st['round-2/ppo']['gold_score']:.3f} | "
                    f"{g:+.3f} [{g - h:+.3f}, {g + h:+.3f}] | {1000 * g / n:+.4f} |")
    g, h, n = paired_gain(ev["active"], ev["random"])
    table = "\n".join(rows) + f"\n\nactive − random, round-2 PPO on the same {n} dev prompts: {g:+.3f} [{g - h:+.3f}, {g + h:+.3f}]\n"
    md = out / "table.md"
    md.write_text(f"`python experiments/active.py --run {args.run} --config {args.config} --fraction {args.fraction} "
                  f"--members {args.members}`\n\n" + table, encoding="utf-8")
    print(f"\n{table}\nactive: table → {md}")


if __name__ == "__main__":
    main()
