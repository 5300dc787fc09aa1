"""`alignloop dpo` side by side with TRL's `DPOTrainer`: same SFT model, same comparisons, same β, learning
rate, schedule, epochs and number of optimizer steps; scored on the world's test prompts against gold.

    pip install --target /tmp/trl trl==1.16.0     # for this benchmark only (not a dependency)
    PYTHONPATH=/tmp/trl python benchmarks/dpo_compare.py --run runs/seed-0 [--beta 0.1] [--work runs/bench-dpo]

The run directory must hold world/, tokenizer/, sft/ and round-1/ with rankings.jsonl and reward/ (the main
job makes them). Three trainings, one after another in this process:
  1. alignloop dpo, K-way    — the round-1 rankings as they are: all C(K,2) pairs of a prompt in one batch
                               element, each answer through the policy once (16 prompts a step);
  2. alignloop dpo, pairs    — the same comparisons expanded to one (chosen, rejected) record each, in
                               batches of B pairs, B chosen so that the step count equals run 1's;
  3. TRL DPOTrainer, pairs   — the same pairs file, batch B, the reference log-probs precomputed as
                               alignloop does (`precompute_ref_log_probs`), sigmoid loss, the same cosine
                               schedule to 10% of the peak, warm-up and gradient clipping at 1.0.
Prompts are given to TRL as alignloop's rendered chat text (`<|bos|><|user|>…<|end|><|assistant|>`; TRL
appends the tokenizer's eos `<|end|>` to each answer), so every run learns the same token sequences. The
train/held-out split is alignloop's (by prompt), the same for all three.

Reported per run: training wall time (the reference pass included), comparisons per second, and the gold
score of the trained policy on the 1,200 test prompts with its 95% interval (`alignloop eval`), beside SFT.
Written to WORK/dpo-compare.md and .json. On 2 CPU cores run it alone: the three timings share the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignloop.cli import run_stage  # noqa: E402
from alignloop.stats import fmt_interval  # noqa: E402


def workdir(run: Path, work: Path, name: str) -> Path:
    """A fresh run-like folder whose world, tokenizer, sft and round-1 reward model are the run's."""
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    (d / "round-1").mkdir(parents=True)
    for sub in ("world", "tokenizer", "sft"):
        (d / sub).symlink_to((run / sub).resolve())
    (d / "round-1" / "reward").symlink_to((run / "round-1" / "reward").resolve())
    return d


def expand_pairs(run: Path, path: Path) -> tuple[list[dict], int]:
    """Every comparison of the round-1 rankings as its own pairs record (chosen/rejected), in
    alignloop's pairs format with the held-out mark each ranking's prompt gets from alignloop's split, so
    that the pairs runs learn and hold out exactly what the K-way run does. (rows, training pairs)."""
    from alignloop.train import dpo, pairs
    groups = pairs.read_comparisons(run / "round-1" / "rankings.jsonl")
    train, val = pairs.split_groups([g for g in groups if g.pairs], dpo.Config())
    rows = []
    for split, gs in (("train", train), ("heldout", val)):
        for g in gs:
            for a, b in g.pairs:
                rows.append({"id": f"{len(rows)}", "prompt": g.prompt, "chosen": g.completions[a],
                             "rejected": g.completions[b], "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, sum(r["split"] == "train" for r in rows)


def ours(d: Path, preset: str, beta: float, lr: float, *flags) -> dict:
    t = time.perf_counter()
    run_stage("dpo", ["--preset", preset, "--out", str(d), "--beta", str(beta), "--lr", str(lr), *flags])
    res = json.loads((d / "round-1" / "dpo" / "eval.json").read_text())
    res["wall_seconds"] = time.perf_counter() - t
    return res


def trl(d: Path, run: Path, rows: list[dict], beta: float, lr: float, batch: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignloop.model import load_causal_lm
    from alignloop.tokenizer import ChatTokenizer

    ctok = ChatTokenizer.load(run / "sft")
    render = lambda msgs: ctok.hf.decode(ctok.render_prompt(msgs), skip_special_tokens=False)  # noqa: E731
    data = [{"prompt": render(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows if r["split"] == "train"]
    tok = AutoTokenizer.from_pretrained(str(run / "sft"))
    assert tok(data[0]["prompt"])["input_ids"] == ctok.render_prompt(rows[0]["prompt"]), "TRL would see other ids"
    model = load_causal_lm(run / "sft")
    ref = load_causal_lm(run / "sft").eval()
    out = d / "round-1" / "dpo"
    cfg = DPOConfig(output_dir=str(d / "trl-work"), beta=beta, learning_rate=lr, per_device_train_batch_size=batch,
                    num_train_epochs=1, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                    warmup_steps=warmup, max_grad_norm=1.0, weight_decay=0.0, logging_steps=10, save_strategy="no",
                    report_to=[], max_length=256, use_cpu=True, dataloader_num_workers=0, precompute_ref_log_probs=True,
                    disable_dropout=True, seed=0)
    t = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(data),
                         processing_class=tok)
    trainer.train()
    seconds = time.perf_counter() - t  # the dataset's tokenisation and the reference pass included, as in ours
    trainer.model.save_pretrained(str(out))
    for f in (run / "sft").iterdir():  # alignloop's tokenizer files, so `alignloop eval` reads the folder
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return {"train_seconds": seconds, "wall_seconds": seconds, "n_train_comparisons": len(data),
            "steps": trainer.state.global_step, "comparisons_per_s": len(data) / seconds,
            "peak_memory_gb": None, "torch_threads": torch.get_num_threads()}


def gold(d: Path, preset: str, stage: str, model: Path) -> dict:
    subprocess.run([sys.executable, "-m", "alignloop", "eval", "--preset", preset, "--out", str(d), "--stage", stage,
                    "--model", str(model), "--reward-model", str(d / "round-1" / "reward")], cwd=ROOT, check=True)
    return json.loads((d / "eval.json").read_text())["stages"][stage]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/seed-0")
    ap.add_argument("--work", default="runs/bench-dpo")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4, help="the tiny preset's DPO learning rate")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--preset", default="tiny", help="the run's preset (its DPO settings and evaluation)")
    args = ap.parse_args()
    run, work = Path(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from alignloop.train.dpo import PRESETS, Config
    warmup = PRESETS[args.preset].get("warmup_steps", Config().warmup_steps)

    res = {}
    d = workdir(run, work, "kway")
    res["alignloop dpo, K-way rankings"] = ours(d, args.preset, args.beta, args.lr, "--data", str(run / "round-1" / "rankings.jsonl"))
    res["alignloop dpo, K-way rankings"]["gold"] = gold(d, args.preset, "round-1/dpo", d / "round-1" / "dpo")
    steps = res["alignloop dpo, K-way rankings"]["steps"]
    d = workdir(run, work, "pairs")
    rows, n_train = expand_pairs(run, d / "pairs.jsonl")
    batch = math.ceil(n_train / steps)  # the same number of optimizer steps over the same comparisons
    print(f"dpo-compare: {n_train} training pairs; batches of {batch} pairs → {math.ceil(n_train / batch)} steps "
          f"(the K-way run took {steps})")
    res["alignloop dpo, pairs"] = ours(d, args.preset, args.beta, args.lr, "--data", str(d / "pairs.jsonl"), "--batch-size", str(batch))
    res["alignloop dpo, pairs"]["gold"] = gold(d, args.preset, "round-1/dpo", d / "round-1" / "dpo")
    if not args.skip_trl:
        d = workdir(run, work, "trl")
        res["TRL DPOTrainer, pairs"] = trl(d, run, rows, args.beta, args.lr, batch, warmup)
        res["TRL DPOTrainer, pairs"]["gold"] = gold(d, args.preset, "round-1/trl-dpo", d / "round-1" / "dpo")
    d = workdir(run, work, "sft")
    sft = gold(d, args.preset, "sft", d / "sft")

    try:  # its version, for the record
        from trl import __version__ as trl_version
    except ImportError:
        trl_version = "not installed"
    lines = [f"# alignloop dpo and TRL DPOTrainer from {run} (β {args.beta:g}, lr {args.lr:g}, 1 epoch)\n",
             "| run | optimizer steps | training pairs | train s | comparisons/s | gold [95%] | KL to SFT |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| SFT | | | | | {sft['gold_score']:.3f} {fmt_interval(sft['ci95']['gold_score'])} | 0 |"]
    for name, r in res.items():
        g = r["gold"]
        lines.append(f"| {name} | {r['steps']} | {r['n_train_comparisons']} | {r['train_seconds']:.1f} | "
                     f"{r['n_train_comparisons'] / r['train_seconds']:.0f} | {g['gold_score']:.3f} "
                     f"{fmt_interval(g['ci95']['gold_score'])} | {g.get('kl_exact', float('nan')):.3f} |")
    text = "\n".join(lines) + (f"\n\nTRL {trl_version}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}. "
                               "comparisons/s = training pairs / training seconds (one epoch; the reference pass "
                               "included for every run).\n")
    (work / "dpo-compare.md").write_text(text)
    (work / "dpo-compare.json").write_text(json.dumps({"sft": sft, **res}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
