"""Where a SmolLM2 PPO iteration's time goes: each phase's seconds, its FLOPs, and its time against the
matrix-product floor this machine reaches (issue 24, item 3).

    python benchmarks/ppo_breakdown.py --model $(bash scripts/get-smollm2.sh) --reward-model RM_FOLDER [--data PATH]

The settings are benchmarks/smollm2_hh.py's PPO run: LoRA rank 16 on the policy and on the value model
(which starts from the reward model; the reference and the reward model are those two with their adapters
off), 16 episodes, at most 48 new tokens at temperature 1, 2 PPO epochs of 2 minibatches of 8, prompts =
the human turns of HH pairs 1,501–1,700 that fit 160 tokens. The phases are the PPO stage's own clocks
(metrics.jsonl, seconds_*); the first iteration is left out (warm-up: the allocator, the engine's copy).

FLOPs, from each iteration's token counts (the matrix products only; attention's own products are added):
  forward pass       2·N per token through the blocks (N: non-embedding parameters), + 2·d·V per token
                     where logits are taken (V: vocabulary, d: width), + 4·L·T·d per token for attention;
  generate           every prompt and answer token once (prefill, then one decode step each) + logits
                     at each answer token;
  reward, values     a forward pass over the scored tokens (no logits);
  log-probs          a forward pass over the padded layout + logits at the answer positions;
  updates            per epoch a forward and a backward pass; with LoRA the backward computes the
                     activations' gradients (one more product per weight) and only the adapters'
                     weight gradients (small): 2× the forward's FLOPs; with --value-lora-layers k the
                     value model's forward and backward run through its top k of L blocks only (the
                     bottom blocks' output is kept from the values pass): 2·k/L×.
The floor: the best GFLOP/s of matrix products of this model's shapes at 256 and 2,048 rows, in the
run's precision (fp32, or bf16 with `--extra "--dtype bfloat16"`: on a CPU with AMX a bf16 product runs
several times faster, and an fp32 floor would flatter a bf16 run), measured here before the run; floor
time = FLOPs / that rate. A phase at 1.0× would be all products
at peak speed; the ratio says how far each phase is from what this CPU can do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from alignloop.cli import run_stage  # noqa: E402
from data import add_data_args, hh_pairs, or_exit  # noqa: E402
from smollm2_hh import prompts_file  # noqa: E402

PHASES = ("generate", "reward_model", "policy_logprobs", "reference_logprobs", "values", "policy_update",
          "value_update", "other")


def matmul_floor(d: int, ff: int, vocab: int, repeats: int = 5, dtype=torch.float32) -> float:
    """The best GFLOP/s of (rows × d) @ (d × k) products for this model's k (attention, MLP, logits)."""
    best = 0.0
    for rows in (256, 2048):
        for k in (d, ff, min(vocab, 8192)):
            a, b = torch.randn(rows, d, dtype=dtype), torch.randn(d, k, dtype=dtype)
            a @ b
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            best = max(best, 2 * rows * d * k / min(times) / 1e9)
    return best


def flops(rec: dict, cfg, B: int, epochs: int, value_layers: int = 0) -> dict[str, float]:
    """Each phase's FLOPs from one iteration's record (see the module's note). `value_layers` > 0: the value
    model's adapters on its top blocks only (--value-lora-layers): its update runs those alone, forward and back."""
    n, d, vocab, layers = cfg["n"], cfg["d"], cfg["vocab"], cfg["layers"]
    top = min(value_layers, layers) / layers if value_layers else 1.0
    P, R, padded = rec["prompt_length"], rec["response_length"], rec["padded_tokens"]
    T = padded / B  # the layout's width
    real = B * (P + R)

    def fwd(tokens, width):
        return tokens * (2 * n + 4 * layers * width * d)
    head = 2 * d * vocab
    lp = fwd(padded, T) + B * R * head
    return {"generate": fwd(real, P + R) + B * R * head, "reward_model": fwd(real, P + R),
            "policy_logprobs": lp, "reference_logprobs": lp, "values": fwd(padded, T),
            "policy_update": epochs * 2 * lp, "value_update": epochs * 2 * top * fwd(padded, T), "other": 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="SmolLM2-135M-Instruct: a .gguf file or a Hugging Face folder (required unless "
                    "--check-data)")
    ap.add_argument("--reward-model", help="a reward-model folder (what `alignloop reward` writes; required unless "
                    "--check-data)")
    add_data_args(ap, "HH-RLHF pairs (the prompts are the human turns of pairs 1,501–1,700)")
    ap.add_argument("--work", default="runs/ppo-breakdown")
    ap.add_argument("--iterations", type=int, default=4, help="PPO iterations; the first is left out of the means")
    ap.add_argument("--extra", default="", help="more `alignloop ppo` flags, space-separated (e.g. a speed option)")
    args = ap.parse_args()
    if not (args.model and args.reward_model) and not args.check_data:
        ap.error("the following arguments are required: --model, --reward-model")
    rows, source = or_exit(hh_pairs, args.data, n=1800)
    if args.check_data:
        print(json.dumps({"data": source, "pairs": len(rows)}))
        return
    from alignloop.model import load_causal_lm, n_params
    from alignloop.sources import resolve_model
    from alignloop.tokenizer import ChatTokenizer
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model(Path(args.model))
    tok = ChatTokenizer.load(model)
    prompts_file(work / "prompts.jsonl", rows[1500:1700], tok, 160)
    lm = load_causal_lm(model)
    c = lm.config
    shape = {"n": n_params(lm, non_embedding=True), "d": c.hidden_size, "vocab": c.vocab_size,
             "layers": c.num_hidden_layers, "ff": c.intermediate_size}
    del lm
    extra = args.extra.split()
    bf16 = "--dtype" in extra and extra[extra.index("--dtype") + 1] in ("bfloat16", "bf16")
    floor32 = matmul_floor(shape["d"], shape["ff"], shape["vocab"])
    floor = matmul_floor(shape["d"], shape["ff"], shape["vocab"], dtype=torch.bfloat16) if bf16 else floor32
    print(f"matrix-product floor: {floor:.1f} GFLOP/s in {'bf16' if bf16 else 'fp32'} (fp32: {floor32:.1f}; "
          f"{torch.get_num_threads()} threads)", flush=True)
    run = work / "run"
    B, epochs = 16, 2
    wall_file = work / "wall-seconds.txt"
    if not (run / "round-1" / "ppo" / "model.safetensors").exists():  # done before: summarised again
        t0 = time.perf_counter()
        run_stage("ppo", ["--out", str(run), "--init", str(model), "--reference", str(model),
                          "--reward-model", args.reward_model, "--prompts", str(work / "prompts.jsonl"),
                          "--iterations", str(args.iterations), "--batch-size", str(B), "--minibatch-size", "8",
                          "--ppo-epochs", str(epochs), "--lora-rank", "16", "--lr", "3e-4", "--kl-coef", "0.1",
                          "--max-new-tokens", "48", "--probe-prompts", "0", "--checkpoint-every", "1000",
                          "--missing-end-penalty", "0", "--reward-norm", *args.extra.split()])
        wall_file.write_text(str(time.perf_counter() - t0))
    wall = float(wall_file.read_text()) if wall_file.exists() else None
    metrics = [json.loads(x) for x in (run / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[1:] or metrics
    secs = {p: statistics.mean(m.get(f"seconds_{p}", 0.0) for m in timed) for p in PHASES}
    value_layers = int(extra[extra.index("--value-lora-layers") + 1]) if "--value-lora-layers" in extra else 0
    fl = {p: statistics.mean(flops(m, shape, B, epochs, value_layers)[p] for m in timed) if secs[p] else 0.0
          for p in PHASES}
    total = sum(secs.values())
    out = {"floor_gflops": floor, "floor_dtype": "bfloat16" if bf16 else "float32", "floor_fp32_gflops": floor32,
           "threads": torch.get_num_threads(), "iterations_timed": len(timed),
           "seconds_per_iteration": total, "wall_seconds": wall, "phases": {
               p: {"seconds": secs[p], "share": secs[p] / total, "gflop": fl[p] / 1e9,
                   "floor_seconds": fl[p] / 1e9 / floor, "x_floor": secs[p] / (fl[p] / 1e9 / floor) if fl[p] else None}
               for p in PHASES},
           "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics),
           "tokens": {k: statistics.mean(m[k] for m in timed) for k in ("prompt_length", "response_length", "padded_tokens")},
           "settings": {**vars(args), "data_source": source, "model_shape": shape}}
    (work / "breakdown.json").write_text(json.dumps(out, indent=1))
    print(f"\n{total:.1f} s an iteration (mean of {len(timed)}), peak memory {out['peak_memory_gb']:.1f} GB\n")
    print("| phase | seconds | share | GFLOP | floor (s) | × floor |\n| --- | --- | --- | --- | --- | --- |")
    for p, r in out["phases"].items():
        x = f"{r['x_floor']:.1f}×" if r["x_floor"] else "—"
        print(f"| {p} | {r['seconds']:.2f} | {r['share']:.0%} | {r['gflop']:.0f} | {r['floor_seconds']:.2f} | {x} |")


if __name__ == "__main__":
    main()
