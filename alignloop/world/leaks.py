"""Do evaluation prompts leak into training files? (`python -m alignloop.world.leaks RUN_DIR`)

Counts, per category, the dev and test prompts whose text appears in a training file: verbatim (the
prompt's last user turn, normalised: case, punctuation and whitespace aside, as whole words) or by any
8-word window of one of its user turns. Training files are what any stage learns from: the world's
corpus, train prompts and demonstrations, and every round's samples, rankings, corrections and pairs.
The assistant turn of a multi-turn prompt's context is a statement of a fact ("The capital of X is Y.")
that the corpus must contain for the model to know the fact; it is not a prompt and is not counted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from alignloop.world.kb import normalise

WINDOW = 8


def windows(text: str, n: int = WINDOW) -> set[tuple[str, ...]]:
    """Every n-word window of a normalised text (none when it is shorter than n words)."""
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def record_texts(rec: dict) -> list[str]:
    """The text a stage can learn from in one record of any training file."""
    out = []
    for k in ("text", "chosen", "rejected", "completion"):
        if isinstance(rec.get(k), str):
            out.append(rec[k])
    for k in ("messages", "prompt"):
        v = rec.get(k)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out += [m.get("content", "") for m in v if isinstance(m, dict)]
    out += [c for c in rec.get("completions") or [] if isinstance(c, str)]
    if isinstance(rec.get("correction"), dict):
        out.append(str(rec["correction"].get("text", "")))
    return out


class TrainingText:
    """The normalised training documents: one string for verbatim search, a set of 8-word windows."""

    def __init__(self, documents: list[str]):
        docs = [normalise(d) for d in documents]
        self.joined = " | " + " | ".join(docs) + " | "  # "|" never occurs in normalised text: no match spans two documents
        self.windows = set().union(*(windows(d) for d in docs)) if docs else set()

    def verbatim(self, text: str) -> bool:
        t = normalise(text)
        return bool(t) and f" {t} " in self.joined

    def window_hit(self, text: str) -> bool:
        return not windows(normalise(text)).isdisjoint(self.windows)


def training_files(run: Path) -> list[Path]:
    """The files any stage trains on, in a run directory or a world folder."""
    world = run / "world" if (run / "world").is_dir() else run
    files = [world / n for n in ("corpus.jsonl", "prompts-train.jsonl", "demonstrations.jsonl")]
    for r in sorted(run.glob("round-*")):
        files += [r / n for n in ("samples.jsonl", "rankings.jsonl", "demonstrations.jsonl", "pairs.jsonl",
                                  "chat-pairs.jsonl")]
    return [f for f in files if f.exists() and f.stat().st_size > 0]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def count_leaks(prompts: list[dict], train: TrainingText) -> dict:
    """{category: {"n", "verbatim", "window"}} and "all": how many prompts leak, each way."""
    out: dict[str, dict] = {}
    for p in prompts:
        users = [m["content"] for m in p["messages"] if m["role"] == "user"]
        for cat in (p["category"], "all"):
            c = out.setdefault(cat, {"n": 0, "verbatim": 0, "window": 0})
            c["n"] += 1
            c["verbatim"] += train.verbatim(users[-1])
            c["window"] += any(train.window_hit(u) for u in users)
    return out


def leak_report(run: Path) -> dict:
    """{split: counts} for every evaluation split the world has (dev and test; `heldout` in old worlds)."""
    world = run / "world" if (run / "world").is_dir() else run
    train = TrainingText([t for f in training_files(run) for rec in _jsonl(f) for t in record_texts(rec)])
    return {split: count_leaks(_jsonl(world / f"prompts-{split}.jsonl"), train)
            for split in ("dev", "test", "heldout") if (world / f"prompts-{split}.jsonl").exists()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m alignloop.world.leaks RUN_DIR   (a run directory or its world/ folder)", file=sys.stderr)
        return 2
    run = Path(argv[0])
    report = leak_report(run)
    if not report:
        print(f"no evaluation prompts under {run}", file=sys.stderr)
        return 2
    print(f"training files: {', '.join(str(f.relative_to(run)) for f in training_files(run))}")
    for split, counts in report.items():
        single = [c for c in counts if c not in ("all", "multi_turn")]
        n1 = sum(counts[c]["n"] for c in single)
        v1, w1 = sum(counts[c]["verbatim"] for c in single), sum(counts[c]["window"] for c in single)
        print(f"{split}: {counts['all']['n']} prompts; single-turn: {v1} of {n1} verbatim, {w1} with an "
              f"{WINDOW}-word window in training files")
        for c in sorted(counts):
            if c != "all":
                print(f"  {c:<13} {counts[c]['verbatim']:>4} verbatim  {counts[c]['window']:>4} window  of {counts[c]['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
