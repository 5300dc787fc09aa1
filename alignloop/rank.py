"""Ranking by the world's simulated labelers (`alignloop rank`).

For each sampled prompt, labelers rank the K answers best to worst and rate (Likert 1–7), flag,
critique and correct them, written as RUN/round-<i>/rankings.jsonl in the rankings format of
docs/formats.md ("Rankings") — the same format people produce in the labeling app. A correction is
also written as a demonstration (demonstrations.jsonl) and as a pair in which it beats the original
(pairs.jsonl).

A share of prompts (`heldout_fraction`) is marked `"split": "heldout"` and ranked by two labelers, so
the reward model's held-out accuracy can be set beside the labelers' own agreement on the same pairs.
Which prompts are held out is fixed once per run (a hash of the prompt id and the seed): a prompt held
out in round 1 is held out in every round, so no round's reward model is scored on a prompt it learned.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from alignloop.config import option
from alignloop.errors import InputError
from alignloop.io import read_records, write_jsonl
from alignloop.rundir import resolve_path, round_dir, save_stage_config

SECTION = "rank"


@dataclass
class Config:
    round: int = option(1, "round number: reads and writes RUN/round-<round>/", min=1)
    samples: str = option("", "samples file (default: RUN/round-<round>/samples.jsonl)")
    labelers_per_prompt: int = option(1, "labelers ranking each training prompt", min=1, max=8)
    heldout_fraction: float = option(0.15, "share of prompts held out for the reward model, ranked by two labelers",
                                     min=0.0, max=0.5)
    correct_fraction: float = option(0.1, "share of rankings where the labeler also corrects the best answer", min=0.0, max=1.0)
    seed: int = option(0, "seed of labeler assignment and noise")


PRESETS = {"micro": {}, "tiny": {}, "small": {}}


def heldout_prompt(key: str, seed: int, fraction: float) -> bool:
    """Is this prompt held out from reward-model training? A pure function of (prompt, seed), the same in
    every round: a uniform number in [0, 1) from SHA-256 of "seed/key", compared with `fraction`."""
    u = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big") / 2**64
    return u < fraction


def run(cfg: Config, out: Path) -> Path:
    from alignloop.world import SPLITS, load_world

    world = load_world(out)
    by_id = {p["id"]: p for split in SPLITS for p in world.prompts(split)}
    path = resolve_path(cfg.samples, out, f"round-{cfg.round}/samples.jsonl")
    samples = read_records(path)
    rng = random.Random(cfg.seed * 104_729 + cfg.round)
    rankings, demos, pairs = [], [], []
    for line, rec in samples:
        prompt = by_id.get(str(rec.get("prompt_id")))
        if prompt is None:
            raise InputError("the simulated labelers only know the world's prompts (unknown prompt_id)",
                             file=path, line=line, field="prompt_id")
        completions = rec.get("completions")
        if not isinstance(completions, list) or len(completions) < 2 or not all(
                isinstance(c, str) and c.strip() for c in completions):
            raise InputError("expected a list of at least 2 non-empty answers (a samples file from `alignloop "
                             "sample`)", file=path, line=line, field="completions")
        if not isinstance(rec.get("prompt"), list):
            raise InputError("expected the prompt's messages", file=path, line=line, field="prompt")
        heldout = heldout_prompt(prompt["id"], cfg.seed, cfg.heldout_fraction)
        n = max(cfg.labelers_per_prompt, 2 if heldout else 1)
        for labeler in rng.sample(world.labelers, min(n, len(world.labelers))):
            order = labeler.rank(prompt, completions, rng)
            r = {"prompt": rec["prompt"], "completions": completions, "ranking": order, "labeler": labeler.name,
                 "ratings": [labeler.rate(prompt, c, rng) for c in completions],
                 "flags": [labeler.flags(prompt, c) for c in completions],
                 "critique": labeler.critique(prompt, completions[order[-1]]),
                 "prompt_id": prompt["id"], "split": "heldout" if heldout else "train", "source": "simulated"}
            if not heldout and rng.random() < cfg.correct_fraction:
                fixed = labeler.correct(prompt, completions[order[0]])
                if fixed and fixed not in completions:
                    r["correction"] = {"index": order[0], "text": fixed}
                    demos.append({"messages": rec["prompt"] + [{"role": "assistant", "content": fixed}]})
                    pairs.append({"prompt": rec["prompt"], "chosen": fixed, "rejected": completions[order[0]],
                                  "labeler": labeler.name, "source": "simulated"})
            rankings.append(r)
    folder = round_dir(out, cfg.round)
    write_jsonl(folder / "rankings.jsonl", rankings)
    write_jsonl(folder / "demonstrations.jsonl", demos)
    write_jsonl(folder / "pairs.jsonl", pairs)
    save_stage_config(out, SECTION, cfg)
    n_pairs = sum(len(r["completions"]) * (len(r["completions"]) - 1) // 2 for r in rankings)
    print(f"rank: {len(rankings)} rankings ({n_pairs} comparisons), {len(demos)} corrections → {folder}")
    return folder / "rankings.jsonl"
