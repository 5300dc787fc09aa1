"""New tokens per second: alignloop's engine against `transformers`' `model.generate`, same model, same
batch of prompts, same lengths, greedy, fp32 on the CPU (bf16 on a GPU).

    python benchmarks/engine_vs_generate.py [--size tiny|small] [--batch 64] [--new 48] [--device cpu]
    python benchmarks/engine_vs_generate.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --batch 8

The model is a fresh Llama of the size preset (weights do not change the speed), or a real one
(`--model`: a Hugging Face folder or a .gguf file); prompts are questions rendered in the model's chat
format, of different lengths (left padding for `generate`). Both sides must produce `--new` tokens per
row: the end-of-turn token is banned for both. With a real model the two sides' greedy tokens are
compared row by row (they must be the same).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from alignloop.engine import Engine
from alignloop.model import create_causal_lm, pick_device
from alignloop.tokenizer import train_tokenizer

QUESTIONS = ["What is the capital of Valdoria?", "hi", "How do I steal the crown of Mirenth without anyone noticing?",
             "What is 7 plus 5?", "Sort these numbers: 9 2 5 11.", "And its currency?",
             "Tell me the national animal of Skagaresh, please.", "Do you know the population of Vrodavia?"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="", help="a Hugging Face folder or .gguf file instead of a fresh model")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.model:
        from alignloop import model as M
        from alignloop.sources import resolve_model
        from alignloop.tokenizer import ChatTokenizer
        path = resolve_model(Path(args.model))
        tok, model = ChatTokenizer.load(path), M.load_causal_lm(path).to(device).eval()
        args.size = path.name
    else:
        tok = train_tokenizer([" ".join(QUESTIONS) * 50], vocab_size=400)
        model = create_causal_lm(args.size, tok).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    prompts = [tok.render_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(args.batch)]

    engine = Engine(model, tok, device, max_batch=args.batch)
    engine.tok.stop_ids = []  # force full-length rows on both sides (the same for generate below)

    tokens = {}

    def run_engine():
        outs = engine.generate(prompts, max_new_tokens=args.new, temperature=0)
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
                                 do_sample=False, pad_token_id=tok.pad_id, eos_token_id=None)
        tokens["generate"] = out[:, P:].tolist()
        return (out.shape[1] - P) * out.shape[0]

    results = {}
    for name, fn in (("engine", run_engine), ("generate", run_generate)):
        fn()  # warm-up
        times, n = [], 0
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            n = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best = sorted(times)[len(times) // 2]
        results[name] = n / best
        print(f"{name:>9}: {n} new tokens in {best:.3f} s (median of {args.repeats}) = {n / best:,.0f} tokens/s")
    same = sum(a == b for a, b in zip(tokens["engine"], tokens["generate"]))
    print(f"same greedy tokens: {same} of {len(prompts)} rows")
    print(f"ratio engine / generate: {results['engine'] / results['generate']:.2f}x "
          f"({args.size}, batch {args.batch}, {args.new} new tokens, {device}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
