"""New tokens per second: alignloop's engine against `transformers`' `model.generate` and against its
continuous batching (`generate_batch`'s machinery), same model, same batch of prompts, same lengths,
greedy (or sampled with --sample), fp32 on the CPU (bf16 on a GPU).

    python benchmarks/engine_vs_generate.py [--size tiny|small] [--batch 64] [--new 48] [--device cpu] [--sample]
    python benchmarks/engine_vs_generate.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --batch 8
    python benchmarks/engine_vs_generate.py --sides engine,generate   # leave out generate_batch (slow on a CPU)

The model is a fresh Llama of the size preset (weights do not change the speed), or a real one
(`--model`: a Hugging Face folder or a .gguf file); prompts are questions rendered in the model's chat
format, of different lengths (left padding for `generate`). Both sides must produce `--new` tokens per
row: the end-of-turn token is banned for both. With a real model the two sides' greedy tokens are
compared row by row (they must be the same).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's alignloop and the benchmarks' helpers
from alignloop.engine import Engine  # noqa: E402
from alignloop.model import pick_device  # noqa: E402
from genbench import hf_continuous, in_turns, load, prompts as chat_prompts  # noqa: E402

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="", help="a Hugging Face folder or .gguf file instead of a fresh model")
    ap.add_argument("--sample", action="store_true", help="temperature 1, top-p 0.9 on every side (not greedy)")
    ap.add_argument("--sides", default="engine,generate,generate_batch")
    args = ap.parse_args()
    device = pick_device(args.device)
    tok, model, args.size = load(args, device)
    prompts = chat_prompts(tok, args.batch)

    engine = Engine(model, tok, device, max_batch=args.batch)
    engine.tok.stop_ids = []  # force full-length rows on both sides (the same for generate below)

    tokens = {}

    def run_engine():
        outs = engine.generate(prompts, max_new_tokens=args.new, **({"temperature": 1.0, "top_p": 0.9, "seed": 0}
                                                                    if args.sample else {"temperature": 0}))
        tokens["engine"] = [o.ids for o in outs]
        return sum(len(o.ids) for o in outs)

    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), tok.pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], attn[i, P - len(p):] = torch.tensor(p), 1
    ids, attn = ids.to(device), attn.to(device)

    def run_generate():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=args.new, min_new_tokens=args.new,
                                 pad_token_id=tok.pad_id, eos_token_id=None,
                                 **({"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 0}
                                    if args.sample else {"do_sample": False}))
        tokens["generate"] = out[:, P:].tolist()
        return (out.shape[1] - P) * out.shape[0]

    def run_generate_batch():
        tokens["generate_batch"] = hf_continuous(model, tok, prompts, [args.new] * len(prompts), args.batch, args.sample)
        return sum(len(t) for t in tokens["generate_batch"])

    sides = {"engine": run_engine, "generate": run_generate, "generate_batch": run_generate_batch}
    # generate_batch is timed once, without a warm-up: on a CPU it is tens of times slower than the others,
    # and a repeat would not change the verdict
    names = args.sides.split(",")
    once = ["generate_batch"] if device.type == "cpu" else []
    timed = in_turns({n: sides[n] for n in names}, args.repeats, device, warmup=args.repeats > 1, once=once)
    results = {}
    for name, (best, runs, n) in timed.items():
        results[name] = n / best
        print(f"{name:>14}: {n} new tokens in {best:.3f} s (median of {runs}) = {n / best:,.0f} tokens/s")
    what = "sampled (top-p 0.9)" if args.sample else "greedy"
    for other in results:
        if other != "engine" and "engine" in results:
            same = sum(a == b for a, b in zip(tokens["engine"], tokens[other]))
            print(f"engine / {other}: {results['engine'] / results[other]:.2f}x; same {what} tokens: {same} of "
                  f"{len(prompts)} rows{' (sampled: different random streams, not expected equal)' if args.sample else ''}")
    print(f"({args.size}, batch {args.batch}, {args.new} new tokens, {what}, {device}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
