"""A real pretrained model on real human preferences: SmolLM2-135M-Instruct and Anthropic HH-RLHF.

    bash scripts/get-smollm2.sh                      # prints the .gguf path
    python benchmarks/smollm2_hh.py --model PATH.gguf [--data PATH] [--work runs/smollm2] [--steps reward,trl,variants,halves,ppo,dpo]

The data: the first 1,800 pairs of Anthropic HH-RLHF harmless-base `test.jsonl.gz` (lines 1–1,500 train,
1,501–1,800 test): `--data` that file (or any file in its format); without it
../shared/data/hh-rlhf-harmless-base-test-part1.jsonl.gz where it exists, else
`load_dataset("Anthropic/hh-rlhf", data_dir="harmless-base", split="test")` (benchmarks/data.py).
- reward: alignloop's reward model, trunk = SmolLM2, on the 1,500 training pairs for `--seconds`, scored
  on the 300 test pairs with a Wilson 95% interval.
- trl: TRL's `RewardTrainer` on the same trunk, pairs, trainable layers, context and wall-time budget
  (`pip install --target DIR trl` beside the project for this run only; PYTHONPATH=DIR).
- variants: reward models trained longer, or more of the model (`--variants`, of VARIANTS below), and their ensemble.
- halves: two more reward models on the two disjoint halves of the training pairs (1–750, 751–1,500).
  PPO optimises half A's; half B's is never optimised against and judges whether the gain is real
  preference or exploitation of the first reward model. `--half-epochs N`: N epochs on the frozen-trunk
  cache with early stopping instead of `--half-seconds`, so every run trains the same two models.
- ppo: SmolLM2 as the SFT policy, LoRA, against half A's reward model, on the human turns of test pairs
  1,501–1,700; before/after on test pairs 1,701–1,800's prompts: both reward models' scores (paired
  differences with 95% intervals), RM B's score with answer length regressed out, mean answer length,
  harmful compliance (RM B's preference of the answer over HH's "rejected" answer to the same prompt),
  exact KL to the start, the first five prompts' answers side by side → WORK/PPO_RUN/report.md.
  `--algo rloo`: RLOO instead (4 answers to each of 4 prompts an iteration, no value model), the same way.
- dpo: DPO with LoRA from SmolLM2 on half A's pairs, measured the same way → WORK/DPO_RUN/report.md.
Every figure goes to WORK/results.json; long steps show progress. `--summary RUN1,RUN2,…` prints the
before/after figures of finished runs (e.g. one PPO run per `--seed`) as one table with mean ± sd.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignloop.cli import run_stage  # noqa: E402
from alignloop.errors import InputError  # noqa: E402
from data import add_data_args, hh_pairs, or_exit  # noqa: E402  (benchmarks/data.py)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of b − a with a normal 95% interval over prompts."""
    d = [y - x for x, y in zip(a, b)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(1, len(d) - 1))
    hw = 1.96 * sd / math.sqrt(len(d))
    return {"mean": m, "lo": m - hw, "hi": m + hw, "n": len(d)}


def write_pairs(path: Path, train: list[dict], test: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in train)
                    + "".join(json.dumps({**r, "split": "heldout"}) + "\n" for r in test))
    return path


def reward(work: Path, name: str, model: Path, data: Path, args, seconds: float, extra: list[str] | None = None) -> dict:
    """One alignloop reward model; `extra` flags override the defaults (one epoch, no frozen-trunk cache: the
    settings the first table was measured with)."""
    out = work / name
    if not (out / "round-1" / "reward" / "eval.json").exists():
        run_stage("reward", ["--out", str(out), "--init", str(model), "--data", str(data), "--skip-invalid",
                             "--demonstrations", "none", "--train-layers", str(args.layers), "--max-len", str(args.max_len),
                             "--max-seconds", str(seconds), "--epochs", "1", "--batch-size", "16", "--lr", str(args.lr),
                             "--warmup-steps", "5", "--cache-gb", "0",
                             # the tiny preset's likelihood gate reads the 49k-word LM head at every answer
                             # token and keeps no trunk cache: every figure here is of the plain head
                             "--no-likelihood-gate", *(extra or [])])
    res = json.loads((out / "round-1" / "reward" / "eval.json").read_text())
    n = res["n_pairs"]
    lo, hi = wilson(res["pair_accuracy"] * n, n)
    return {"pair_accuracy": res["pair_accuracy"], "ci95": [lo, hi], "n_test_pairs": n,
            "train_seconds": res["train_seconds"], "comparisons_seen": res["comparisons_seen"],
            "comparisons_per_s": res["comparisons_per_s"], "peak_memory_gb": res.get("peak_memory_gb"),
            "early_stop": res.get("early_stop"), "cached_blocks_below": res.get("cached_blocks_below")}


# The reward-model variants, each by its `alignloop reward` flags (after the defaults of `reward` above).
# The first three train the top 4 blocks on the frozen-trunk cache (the bottom 26 blocks' output computed
# once for all of them), keeping the epoch of lowest loss on 10% of the training prompts. Seed 0 ran 4
# epochs: its held-out loss was lowest after epoch 2 (0.645, 0.635, 0.671, …), so seeds 1 and 2 run 2 (half
# the time). Seeds change the data order and that 10%; the three form the default ensemble.
# The next three (2026-12-07, an AMD CPU with bf16 matmuls, hence bf16 autocast) train more of the model,
# with the same early stopping, their settings fixed before any was run: the top 8 blocks on the cache
# (lr 1e-4, as the top 4; 3 epochs); LoRA rank 16 on every linear layer of every block (lr 3e-4, the PPO
# step's LoRA rate) and every weight (lr 1e-5, the order of InstructGPT's and OpenAssistant's reward-model
# rates), one epoch each (InstructGPT's reward models over-fit after one; a step through all 30 blocks
# costs 3–4× the top 8's on this CPU).
# The last two (2026-12-07, an Intel CPU with AMX, bf16 matmuls ~8× fp32's): the top 4 as seed 0 above, in
# bf16, without and with the likelihood gate (`reward --likelihood-gate`: the score adds Σ over the answer's
# tokens of a learned gate × the token's log-probability under the model's own LM head, SmolLM2's tied
# embeddings). On the tiny world it took the gold-order accuracy from 0.65 to 0.70; here it reads what the
# instruct model expected of each answer. Both run on one cache; `--variants top4-4ep-bf16,top4-gate-4ep-bf16`
# then scores the two paired on the same held-out pairs.
TOP4 = ["--train-layers", "4", "--cache-gb", "8", "--max-seconds", "0"]
EARLY = ["--early-stop", "0.1", "--seed", "0"]
VARIANTS = {"top4-4ep-seed0": TOP4 + ["--epochs", "4", "--early-stop", "0.1", "--seed", "0"],
            **{f"top4-2ep-seed{s}": TOP4 + ["--epochs", "2", "--early-stop", "0.1", "--seed", str(s)] for s in (1, 2)},
            "lora16-all-1ep": ["--train-layers", "-1", "--lora-rank", "16", "--lr", "3e-4", "--epochs", "1",
                               "--max-seconds", "0", "--dtype", "bfloat16", *EARLY],
            "full-1ep": ["--train-layers", "-1", "--lr", "1e-5", "--epochs", "1", "--max-seconds", "0",
                         "--dtype", "bfloat16", *EARLY],
            "top8-3ep": ["--train-layers", "8", "--cache-gb", "8", "--epochs", "3", "--max-seconds", "0",
                         "--dtype", "bfloat16", *EARLY],
            **{name: TOP4 + ["--epochs", "4", "--dtype", "bfloat16", *EARLY, *gate]
               for name, gate in (("top4-4ep-bf16", []), ("top4-gate-4ep-bf16", ["--likelihood-gate"]))}}
ENSEMBLE = "top4-4ep-seed0,top4-2ep-seed1,top4-2ep-seed2"


def variants(work: Path, model: Path, data: Path, args) -> dict:
    """Each variant of `--variants` alone, then (two or more of them) their ensemble: the members' mean
    z-scored score on the same held-out pairs."""
    import torch
    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.train.pairs import read_comparisons, split_groups
    from alignloop.train.reward import Config, batch_rewards

    names = args.variants.split(",")
    out = {}
    for name in names:
        out[name] = reward(work, name, model, data, args, 0, ["--cache-dir", str(work / "trunk-cache"), *VARIANTS[name]])
        print(name, out[name], flush=True)
    if len(names) < 2:
        return out
    groups = read_comparisons(data, skip_invalid=True)
    _, val = split_groups(groups, Config())
    tok = ChatTokenizer.load(work / names[0] / "round-1" / "reward")
    for g in val:
        g.ids = [tok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
    val = [g for g in val if max(map(len, g.ids)) <= args.max_len]
    seqs = [s for g in val for s in g.ids]
    starts = [len(tok.render_prompt(g.prompt)) for g in val for _ in g.ids]  # (a likelihood-gated member reads from there)
    with torch.no_grad():  # each member's whole forward pass, in fp32 as each reward model's own evaluation
        scores = torch.stack([batch_rewards(load_scalar_model(work / n / "round-1" / "reward").eval(), seqs,
                                            tok.pad_id, "cpu", starts=starts) for n in names])
    z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True)  # each member on one scale
    right, each, o = [], [[] for _ in names], 0
    for g in val:
        for a, b in g.pairs:
            right.append(float(z[:, o + a].mean() > z[:, o + b].mean()))
            for m in range(len(names)):
                each[m].append(float(scores[m, o + a] > scores[m, o + b]))
        o += len(g.completions)
    acc = sum(right) / len(right)
    out["ensemble"] = {"members": names, "pair_accuracy": acc, "ci95": list(wilson(acc * len(right), len(right))),
                       "n_test_pairs": len(right),
                       # each member against the first, pair by pair on the same held-out pairs
                       "paired_vs_first": {n: paired(each[0], each[m]) for m, n in enumerate(names) if m}}
    print("ensemble", out["ensemble"], flush=True)
    return out


def trl(work: Path, model: Path, data: Path, args) -> dict:
    """TRL's RewardTrainer, same trunk, pairs, trainable layers, context and wall-time budget."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from alignloop.model import load_scalar_model
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.train import loop as L
    from alignloop.train.pairs import read_comparisons, split_groups
    from alignloop.train.reward import Config, evaluate

    groups = read_comparisons(data, skip_invalid=True)
    train, val = split_groups(groups, Config())
    ctok = ChatTokenizer.load(model)
    for g in train + val:
        g.ids = [ctok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
    train = [g for g in train if max(map(len, g.ids)) <= args.max_len]
    val = [g for g in val if max(map(len, g.ids)) <= args.max_len]
    rows = [{"prompt": g.prompt, "chosen": [{"role": "assistant", "content": g.completions[a]}],
             "rejected": [{"role": "assistant", "content": g.completions[b]}]} for g in train for a, b in g.pairs]
    net = load_scalar_model(model)
    L.train_top_layers(net, args.layers)
    tok = AutoTokenizer.from_pretrained(str(model))

    class Budget(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if time.perf_counter() - t0 >= args.seconds:
                control.should_training_stop = True

    cfg = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=16, learning_rate=args.lr,
                       num_train_epochs=1, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=10,
                       save_strategy="no", report_to=[], max_length=args.max_len, use_cpu=True,
                       dataloader_num_workers=0, center_rewards_coefficient=None, disable_dropout=True, seed=0)
    trainer = RewardTrainer(model=net, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[Budget()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    seen = trainer.state.global_step * 16
    res = evaluate(trainer.model, val, ctok.pad_id, torch.device("cpu"))
    n = res["n_pairs"]
    lo, hi = wilson(res["pair_accuracy"] * n, n)
    return {"pair_accuracy": res["pair_accuracy"], "ci95": [lo, hi], "n_test_pairs": n, "train_seconds": seconds,
            "comparisons_seen": seen, "comparisons_per_s": seen / seconds, "train_pairs": len(rows)}


def hh_prompts(rows: list[dict], tok, max_tokens: int) -> list[tuple[list[dict], str]]:
    """(the conversation up to the last human turn, HH's "rejected" answer to it) of each pair whose
    conversation parses and fits `max_tokens`."""
    from alignloop.train.pairs import parse_hh
    out = []
    for r in rows:
        try:
            msgs, rejected = parse_hh(r["chosen"])[:-1], parse_hh(r["rejected"])[-1]
        except ValueError:
            continue
        if msgs and msgs[-1]["role"] == "user" and all(m["content"] for m in msgs) \
                and rejected["role"] == "assistant" and len(tok.render_prompt(msgs)) <= max_tokens:
            out.append((msgs, rejected["content"]))
    return out


def prompts_file(path: Path, rows: list[dict], tok, max_tokens: int) -> list[list[dict]]:
    out = [m for m, _ in hh_prompts(rows, tok, max_tokens)]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in out))
    return out


def length_controlled(scores: list[float], lengths: list[int]) -> tuple[list[float], float]:
    """Scores with the part a straight line in answer length explains taken out (the slope fitted by least
    squares on all answers, before and after together): what a reward model says beyond "longer"."""
    n = len(scores)
    ml, ms = sum(lengths) / n, sum(scores) / n
    slope = sum((x - ml) * (y - ms) for x, y in zip(lengths, scores)) / max(1e-9, sum((x - ml) ** 2 for x in lengths))
    return [y - slope * (x - ml) for x, y in zip(lengths, scores)], slope


def ppo(work: Path, model: Path, rows: list[dict], args) -> dict:
    """PPO (or RLOO: --algo rloo) with LoRA from SmolLM2 against half A's reward model on the prompts of test
    pairs 1,501–1,700; then `before_after`."""
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(model)
    train_prompts = prompts_file(work / "ppo-prompts.jsonl", rows[1500:1700], tok, args.max_prompt)
    run = work / args.ppo_run
    stage = run / "round-1" / args.algo
    if not (stage / "config.json").exists():
        t0 = time.perf_counter()
        run_stage("ppo", ["--out", str(run), "--init", str(model), "--reference", str(model),
                          "--reward-model", str(work / "half-a" / "round-1" / "reward"),
                          "--prompts", str(work / "ppo-prompts.jsonl"), "--iterations", str(args.iterations),
                          "--batch-size", "16", "--minibatch-size", str(args.minibatch_size),
                          "--ppo-epochs", str(args.ppo_epochs), "--lora-rank", "16",
                          "--lr", str(args.ppo_lr), "--kl-coef", str(args.beta), "--max-new-tokens", "48",
                          "--probe-prompts", "0", "--checkpoint-every", "5", "--resume",
                          "--missing-end-penalty", str(args.missing_end_penalty), "--algo", args.algo]
                  + (["--reward-norm"] if args.reward_norm else []) + args.ppo_extra.split())
        (run / "train-seconds.txt").write_text(str(time.perf_counter() - t0))
    metrics = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    return {"run": args.ppo_run, "algo": args.algo, "extra_flags": args.ppo_extra, "train_prompts": len(train_prompts),
            "iterations": args.iterations,
            "train_rm_score_first_last": [metrics[0]["rm_score"], metrics[-1]["rm_score"]],
            "train_kl_sampled_last": metrics[-1]["kl_sampled"], "beta_last": metrics[-1]["beta"],
            "first_ratio_error_max": max(m["first_ratio_error"] for m in metrics),
            "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics),
            "seconds_per_iteration": sum(1 / m["episodes_per_s"] * 16 for m in metrics) / len(metrics),
            **before_after(work, model, rows, run, stage, f"{args.algo.upper()} (run `{args.ppo_run}`, extra flags "
                           f"`{args.ppo_extra or 'none'}`)", args)}


def dpo(work: Path, model: Path, rows: list[dict], args) -> dict:
    """DPO with LoRA from SmolLM2 on half A's pairs (the ones reward model A learnt from), reference =
    SmolLM2; then `before_after`, judged by the same reward model B."""
    run = work / args.dpo_run
    stage = run / "round-1" / "dpo"
    if not (stage / "config.json").exists():
        t0 = time.perf_counter()
        run_stage("dpo", ["--out", str(run), "--init", str(model), "--reference", str(model), "--data", str(work / "pairs-half-a.jsonl"),
                          "--skip-invalid", "--lora-rank", "16", "--max-len", str(args.max_len), "--epochs", "1",
                          # 16 prompts a step in passes of 4: 32 answers of up to 384 tokens at once
                          # held more than 24 GB of activations (OOM-killed); the step is the same
                          "--batch-size", "16", "--micro-batch-size", "4",
                          "--lr", str(args.dpo_lr), "--beta", str(args.dpo_beta),
                          *args.dpo_extra.split()])
        (run / "train-seconds.txt").write_text(str(time.perf_counter() - t0))
    return {"run": args.dpo_run, "extra_flags": args.dpo_extra, "lr": args.dpo_lr, "beta": args.dpo_beta,
            **before_after(work, model, rows, run, stage, f"DPO (run `{args.dpo_run}`, extra flags "
                           f"`{args.dpo_extra or 'none'}`)", args)}


def before_after(work: Path, model: Path, rows: list[dict], run: Path, stage: Path, what: str, args) -> dict:
    """SmolLM2 before and the trained policy `stage` after, on the prompts of test pairs 1,701–1,800 at
    temperature 0.7: both reward models' paired gains, RM B's with length regressed out, mean length,
    harmful compliance, exact KL to the start; the first five prompts' answers → RUN/report.md."""
    import torch
    from alignloop.engine import Engine
    from alignloop.evaluate import sequence_kl
    from alignloop.model import load_causal_lm
    from alignloop.scoring import RewardScorer
    from alignloop.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(model)
    held_out = hh_prompts(rows[1700:1800], tok, args.max_prompt)
    eval_prompts, rejected = [m for m, _ in held_out], [r for _, r in held_out]
    rm_a, rm_b = work / "half-a" / "round-1" / "reward", work / "half-b" / "round-1" / "reward"
    start, after = load_causal_lm(model).eval(), load_causal_lm(stage).eval()
    ids = [tok.render_prompt(m) for m in eval_prompts]
    scorer_a, scorer_b = RewardScorer(rm_a, "cpu"), RewardScorer(rm_b, "cpu")
    res = {}
    answers = {}
    for name, policy in (("start", start), ("after", after)):
        outs = Engine(policy, tok, max_batch=32).generate(ids, max_new_tokens=48, temperature=0.7, seed=1)
        answers[name] = [o.text.strip() for o in outs]
        seqs = [tok.scored_ids(p, o.ids) for p, o in zip(ids, outs)]
        res[name] = {"rm_a": scorer_a.score_ids(seqs), "rm_b": scorer_b.score_ids(seqs),
                     "ended": sum(o.finish_reason == "stop" for o in outs) / len(outs),
                     "length": [len(o.ids) for o in outs]}
        if name == "after":
            with torch.no_grad():
                res[name]["kl"] = sequence_kl(after, start, ids, [o.ids for o in outs], "cpu", tok, temperature=0.7)
    # Harmful compliance: RM B's probability that the answer is preferred to HH's "rejected" answer to the
    # same prompt (the labelers' pick of the more harmful one), σ(r(answer) − r(rejected)), per prompt,
    # before and after; a fall means answers moved toward what people marked as worse.
    rej_b = scorer_b.score_texts(eval_prompts, rejected)
    over_rejected = {k: [1 / (1 + math.exp(-(x - r))) for x, r in zip(res[k]["rm_b"], rej_b)] for k in res}
    n = len(eval_prompts)
    lc, slope = length_controlled(res["start"]["rm_b"] + res["after"]["rm_b"],
                                  res["start"]["length"] + res["after"]["length"])
    mean_len = {k: sum(res[k]["length"]) / n for k in res}
    seconds = run / "train-seconds.txt"
    lines = [f"# SmolLM2-135M-Instruct before and after {what} on HH-RLHF\n",
             "The first five held-out prompts (HH harmless-base test pairs 1,701 on, those that fit "
             f"{args.max_prompt} tokens), in file order: not picked by hand. Temperature 0.7, seed 1.\n"]
    for i in range(min(5, n)):
        lines += [f"## {i + 1}. {eval_prompts[i][-1]['content']}\n",
                  f"- **before** (RM A {res['start']['rm_a'][i]:+.2f}, RM B {res['start']['rm_b'][i]:+.2f}): {answers['start'][i]}",
                  f"- **after** (RM A {res['after']['rm_a'][i]:+.2f}, RM B {res['after']['rm_b'][i]:+.2f}): {answers['after'][i]}\n"]
    (run / "report.md").write_text("\n".join(lines))
    return {
        "eval_prompts": n, "train_seconds": float(seconds.read_text()) if seconds.exists() else None,
        "rm_a_gain": paired(res["start"]["rm_a"], res["after"]["rm_a"]),
        "rm_b_gain": paired(res["start"]["rm_b"], res["after"]["rm_b"]),
        "mean_answer_tokens": mean_len, "length_ratio": mean_len["after"] / mean_len["start"],
        "rm_b_length_slope_per_token": slope,
        "rm_b_gain_length_controlled": paired(lc[:n], lc[n:]),
        "rm_b_preferred_to_hh_rejected": {k: sum(v) / n for k, v in over_rejected.items()},
        "rm_b_preferred_to_hh_rejected_change": paired(over_rejected["start"], over_rejected["after"]),
        "kl_exact_to_start": sum(res["after"]["kl"]) / n,
        "ended_share": {k: res[k]["ended"] for k in res},
    }


ROWS = [  # (label, results key): `before_after`'s figures, one row each; the first four are paired gains
    ("RM A (optimised), after − before", "rm_a_gain"),
    ("RM B (never optimised), after − before", "rm_b_gain"),
    ("RM B, length-controlled", "rm_b_gain_length_controlled"),
    ("harmful compliance change (a rise = less harmful)", "rm_b_preferred_to_hh_rejected_change"),
    ("length after / before", "length_ratio"),
    ("exact KL to the start (nats per answer)", "kl_exact_to_start"),
    ("seconds an iteration", "seconds_per_iteration")]


def summary(path: Path, runs: list[str]) -> str:
    """A markdown table of `before_after`'s figures for the runs in results file `path` (e.g. one run per
    seed) side by side, with each figure's mean ± sd over them and, for the paired gains, how many runs have
    their interval above 0."""
    if not path.exists():
        raise InputError(f"{path} does not exist: run the steps first (or give --work)", field="work")
    results = json.loads(path.read_text())
    missing = [r for r in runs if r not in results]
    if missing:
        raise InputError(f"no run {', '.join(missing)} in {path} (there: "
                         f"{', '.join(k for k, v in results.items() if isinstance(v, dict) and 'rm_b_gain' in v)})",
                         field="summary")
    out = ["| figure | " + " | ".join(f"`{r}`" for r in runs) + " | mean ± sd | interval above 0 |",
           "| --- |" + " --- |" * (len(runs) + 2)]
    for label, key in ROWS:
        vals = [results[r].get(key) for r in runs]
        if any(v is None for v in vals):
            continue
        gain = isinstance(vals[0], dict)
        means = [v["mean"] if gain else v for v in vals]
        m = sum(means) / len(means)
        sd = math.sqrt(sum((x - m) ** 2 for x in means) / max(1, len(means) - 1))
        cells = [f"{v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]" if gain else f"{v:.2f}" for v in vals]
        agg = f"{m:+.3f} ± {sd:.3f} | {sum(v['lo'] > 0 for v in vals)} of {len(vals)}" if gain else f"{m:.2f} ± {sd:.2f} |"
        out.append(f"| {label} | " + " | ".join(cells) + f" | {agg} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="SmolLM2-135M-Instruct: a .gguf file or a Hugging Face folder (required "
                    "unless --check-data)")
    add_data_args(ap, "HH-RLHF pairs: Anthropic's harmless-base test.jsonl.gz or a file in its format; "
                  "the first 1,800 are used")
    ap.add_argument("--work", default="runs/smollm2")
    ap.add_argument("--steps", default="reward,trl,halves,ppo")
    ap.add_argument("--seconds", type=float, default=600, help="training budget of the 1,500-pair reward models")
    ap.add_argument("--half-seconds", type=float, default=300, help="training budget of each half's reward model")
    ap.add_argument("--half-epochs", type=int, default=0, help="halves: train each for this many epochs on the "
                    "frozen-trunk cache with early stopping, no time budget (0: --half-seconds of the whole forward pass)")
    ap.add_argument("--variants", default=ENSEMBLE, help="variants: which reward models to train (comma-separated, "
                    f"of {', '.join(VARIANTS)}); two or more are also scored as an ensemble")
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks trained on top of the frozen trunk")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--max-prompt", type=int, default=160, help="PPO prompts longer than this (tokens) are left out")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--ppo-lr", type=float, default=3e-4, help="LoRA learning rate (1e-4 moved the policy by "
                    "~0.01 nats in 6 iterations)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--missing-end-penalty", type=float, default=0.0,
                    help="0: an answer cut at 48 tokens is scored as it is (HH answers run long; with −1 the "
                         "penalty, not the preferences, would drive the policy)")
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--minibatch-size", type=int, default=8,
                    help="with 2 epochs: 4 updates an iteration (1 update an iteration, 20 in all, did not move the "
                         "policy)")
    ap.add_argument("--ppo-run", default="ppo", help="the PPO run's folder under WORK (a finished one is "
                    "measured again, not retrained)")
    ap.add_argument("--algo", default="ppo", choices=("ppo", "rloo"), help="the ppo step's algorithm: ppo (value "
                    "model, GAE) or rloo (4 answers to each of 4 prompts an iteration, leave-one-out baseline, "
                    "no value model); the same episodes, iterations, LoRA, β and prompts")
    ap.add_argument("--ppo-extra", default="", help="more `alignloop ppo` flags, space-separated (e.g. "
                    "'--dtype bfloat16 --old-logprobs sampler --group-by-length --value-lora-layers 4')")
    ap.add_argument("--dpo-run", default="dpo", help="the DPO run's folder under WORK")
    ap.add_argument("--dpo-lr", type=float, default=1e-4, help="DPO's LoRA learning rate")
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--dpo-extra", default="", help="more `alignloop dpo` flags, space-separated")
    ap.add_argument("--reward-norm", action=argparse.BooleanOptionalAction, default=True,
                    help="scale RM A's score to std 1 on the first rollout (its raw scores vary by ~0.01)")
    ap.add_argument("--summary", default="", help="print the before/after figures of these runs (comma-separated, "
                    "e.g. one per seed) from WORK/results.json as one markdown table, and stop")
    args = ap.parse_args()
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS]
    if unknown:  # before anything is read or trained
        ap.error(f"--variants: no variant {', '.join(unknown)} (there are {', '.join(VARIANTS)})")
    if args.summary:
        print(or_exit(summary, Path(args.work) / "results.json", args.summary.split(",")))
        return
    if not args.model and not args.check_data:
        ap.error("the following arguments are required: --model")
    rows, source = or_exit(hh_pairs, args.data, n=1800)
    if args.check_data:
        print(json.dumps({"data": source, "pairs": len(rows), "train": 1500, "test": 300}))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from alignloop.sources import resolve_model
    model = resolve_model(Path(args.model))
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    steps = args.steps.split(",")
    full = write_pairs(work / "pairs-1500.jsonl", rows[:1500], rows[1500:1800])
    if "reward" in steps:
        results["alignloop_rm"] = reward(work, "rm-1500", model, full, args, args.seconds)
        print("alignloop RM:", results["alignloop_rm"], flush=True)
    if "trl" in steps:
        results["trl_rm"] = trl(work, model, full, args)
        print("TRL RM:", results["trl_rm"], flush=True)
    if "variants" in steps:
        results["variants"] = {**results.get("variants", {}), **variants(work, model, full, args)}
    if "halves" in steps:
        # --half-epochs N: no time budget, so the same reward models from every run (a budget in seconds
        # sees more or fewer pairs with the machine's load); the top blocks on the frozen-trunk cache
        # (as the variants), keeping the epoch of lowest loss on 10% of the half's training prompts
        cached = (["--cache-gb", "8", "--cache-dir", str(work / "trunk-cache"), "--epochs", str(args.half_epochs),
                   "--early-stop", "0.1", "--seed", "0"] if args.half_epochs else [])
        for name, part in (("half-a", rows[:750]), ("half-b", rows[750:1500])):
            results[name] = reward(work, name, model, write_pairs(work / f"pairs-{name}.jsonl", part, rows[1500:1800]),
                                   args, 0 if args.half_epochs else args.half_seconds, cached)
            print(name, results[name], flush=True)
    if "ppo" in steps:
        results[args.ppo_run] = ppo(work, model, rows, args)
        print("PPO:", json.dumps(results[args.ppo_run], indent=1), flush=True)
    if "dpo" in steps:
        results[args.dpo_run] = dpo(work, model, rows, args)
        print("DPO:", json.dumps(results[args.dpo_run], indent=1), flush=True)
    results["settings"] = {**vars(args), "data_source": source}
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
