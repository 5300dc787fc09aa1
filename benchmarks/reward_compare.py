"""Grouped K-way reward-model training against shuffled independent pairs, and against TRL's
`RewardTrainer`, on the same model and the same comparisons.

    pip install trl==1.16.0      # for this benchmark only
    python benchmarks/reward_compare.py --run runs/tiny [--round 1] [--epochs 1]

The run directory must hold sft/ and round-<round>/rankings.jsonl (the main job makes them). Reported:
held-out pairwise accuracy (the labelers' held-out rankings), training wall time and comparisons per
second, for
  1. grouped  — all C(K,2) pairs of a prompt in one batch element (K forward passes per prompt);
  2. pairs    — the same comparisons as independent shuffled pairs (2 forward passes per comparison);
  3. pairs at equal compute — pairs stopped at the grouped run's wall time;
  4. TRL      — `trl.RewardTrainer` on the same pairs, same model, batch, learning rate and epochs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignloop.cli import run_stage  # noqa: E402


def ours(run: Path, args, name: str, *flags) -> dict:
    out = Path(args.work) / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sub in ("world", "tokenizer"):
        (out / sub).symlink_to((run / sub).resolve())
    data = run / f"round-{args.round}" / "rankings.jsonl"
    run_stage("reward", ["--out", str(out), "--data", str(data), "--init", str(run / "sft"), "--epochs", str(args.epochs),
                         "--batch-size", str(args.batch), "--lr", str(args.lr),
                         "--no-likelihood-gate",  # the plain head, as TRL's (the tiny preset's gate is off here)
                         *flags])
    return json.loads((out / "round-1" / "reward" / "eval.json").read_text())


def trl_run(run: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignloop.model import load_scalar_model
    from alignloop.train.pairs import read_comparisons, split_groups
    from alignloop.train.reward import Config, evaluate
    from alignloop.tokenizer import ChatTokenizer

    groups = read_comparisons(run / f"round-{args.round}" / "rankings.jsonl")
    train, val = split_groups(groups, Config())
    rows = [{"prompt": g.prompt, "chosen": [{"role": "assistant", "content": g.completions[a]}],
             "rejected": [{"role": "assistant", "content": g.completions[b]}]} for g in train for a, b in g.pairs]
    out = Path(args.work) / "trl"
    shutil.rmtree(out, ignore_errors=True)
    model = load_scalar_model(run / "sft")
    tok = AutoTokenizer.from_pretrained(str(run / "sft"))
    cfg = RewardConfig(output_dir=str(out), per_device_train_batch_size=args.batch, learning_rate=args.lr,
                       num_train_epochs=args.epochs, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=50,
                       save_strategy="no", report_to=[], max_length=256, use_cpu=True, dataloader_num_workers=0,
                       center_rewards_coefficient=None, disable_dropout=True, seed=0)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    ctok = ChatTokenizer.load(run / "sft")
    for g in val:
        g.ids = [ctok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
    res = evaluate(trainer.model, val, ctok.pad_id, torch.device("cpu"))
    return {"pair_accuracy": res["pair_accuracy"], "labeler_agreement": res["labeler_agreement"],
            "train_seconds": seconds, "comparisons_seen": len(rows) * args.epochs,
            "comparisons_per_s": len(rows) * args.epochs / seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", default="runs/bench-reward")
    ap.add_argument("--skip-trl", action="store_true")
    args = ap.parse_args()
    run = Path(args.run)
    rows = {"grouped K-way": ours(run, args, "grouped", "--grouped")}
    rows["shuffled pairs"] = ours(run, args, "pairs", "--no-grouped")
    rows["pairs, equal compute"] = ours(run, args, "pairs-equal", "--no-grouped", "--max-seconds",
                                        str(rows["grouped K-way"]["train_seconds"]))
    if not args.skip_trl:
        rows["TRL RewardTrainer"] = trl_run(run, args)
    print(f"\n{'method':<22} {'held-out acc':>12} {'labelers':>9} {'train s':>8} {'comparisons/s':>14}")
    for name, r in rows.items():
        agr = r.get("labeler_agreement")
        print(f"{name:<22} {r['pair_accuracy']:>12.3f} {agr if agr is None else round(agr, 3)!s:>9} "
              f"{r['train_seconds']:>8.1f} {r['comparisons_per_s']:>14,.0f}")


if __name__ == "__main__":
    main()
