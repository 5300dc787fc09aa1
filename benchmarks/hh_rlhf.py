"""A reward model on real human preferences: Anthropic HH-RLHF (harmless-base), 1,500 pairs to train
and the next 300 to test, on a model pretrained FROM SCRATCH by alignloop on the training dialogues.

    python benchmarks/hh_rlhf.py [--data PATH] [--seconds 150] [--out runs/bench-hh]

The data (benchmarks/data.py): `--data` Anthropic's harmless-base `test.jsonl.gz` (or any file in that
format: .jsonl, .jsonl.gz, .parquet), of which the first 1,800 pairs are used; without it
../shared/data/hh-rlhf-harmless-base-test-part1.jsonl.gz where it exists, else
`load_dataset("Anthropic/hh-rlhf", data_dir="harmless-base", split="test")`.

Six of the 1,800 pairs are malformed in the source (an empty last assistant turn, or a turn marker that
lost its newlines): `--skip-invalid` leaves them out and the run says how many.

Steps: tokenizer on the 1,500 training dialogues → pretraining on their text for `--seconds` → the
reward model (grouped loss, K = 2) on the 1,500 pairs → accuracy on the 300 held-out pairs (chance: 50%).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import add_data_args, hh_pairs, or_exit  # noqa: E402  (benchmarks/data.py)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap, "HH-RLHF pairs: Anthropic's harmless-base test.jsonl.gz or a file in its format; "
                  "the first 1,800 are used")
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--out", default="runs/bench-hh")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    rows, source = or_exit(hh_pairs, args.data, n=1800)
    if args.check_data:
        print(json.dumps({"data": source, "pairs": len(rows), "train": 1500, "test": 300}))
        return
    from alignloop.cli import run_stage
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = rows[:1500], rows[1500:1800]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train)
                                     + "".join(json.dumps({**r, "split": "heldout"}) + "\n" for r in test))
    (out / "text.jsonl").write_text("".join(json.dumps({"text": r[k]}) + "\n" for r in train for k in ("chosen", "rejected")))
    run_stage("tokenizer", ["--out", str(out), "--data", str(out / "text.jsonl"), "--vocab-size", "4096"])
    run_stage("pretrain", ["--out", str(out), "--data", str(out / "text.jsonl"), "--size", "tiny", "--seq-len", "128",
                           "--max-steps", "100000", "--max-seconds", str(args.seconds), "--eval-every", "100000",
                           "--sample-every", "0", "--checkpoint-every", "100000", "--val-fraction", "0.02"])
    run_stage("reward", ["--out", str(out), "--data", str(out / "pairs.jsonl"), "--init", str(out / "pretrain"),
                         "--demonstrations", "none", "--epochs", str(args.epochs), "--max-len", "256",
                         "--no-likelihood-gate",  # the plain head the figures were measured with (not the tiny preset's gate)
                         "--skip-invalid"])  # 6 of the 1,800 real pairs are malformed: counted, left out
    res = json.loads((out / "round-1" / "reward" / "eval.json").read_text())
    print(json.dumps({"held_out_pairs": res["n_pairs"], "pair_accuracy": round(res["pair_accuracy"], 4),
                      "chance": 0.5, "train_pairs_used": res["n_train_comparisons"], "data": source}))


if __name__ == "__main__":
    main()
