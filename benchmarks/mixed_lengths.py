"""Tokens per second on a workload of mixed answer lengths (as when sampling K answers, or PPO rollouts):
continuous batching against static batching, and against `transformers`' own continuous batching.

    python benchmarks/mixed_lengths.py [--size tiny] [--requests 256] [--batch 64] [--min-new 8] [--max-new 256]
                                       [--modes continuous,static,chunked,hf] [--static-rev 9938be8] [--device cpu]
    python benchmarks/mixed_lengths.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --requests 64 --batch 32
    # a quick check that every mode runs (seconds):
    python benchmarks/mixed_lengths.py --size micro --requests 6 --batch 2 --min-new 2 --max-new 12 --repeats 1

Request i asks for exactly n_i new tokens, n_i drawn uniformly from [--min-new, --max-new] (seed --seed);
the end-of-turn token is banned on every side, so every answer has its length and every mode does the same
useful work (the sum of the n_i). Greedy. The modes:

- continuous: `Engine.generate` (this engine: a row leaves at its length, a waiting request takes its slot
  at the next step);
- static: the engine as it was before continuous batching (alignloop/engine.py at git revision
  --static-rev, loaded from git): batches of --batch prompts, each runs until its longest row ends;
- chunked: this engine called on --batch prompts at a time, every row of a chunk decoding as long as the
  chunk's longest (the cost model of static batching on today's kernels: isolates the scheduling gain);
- hf: `transformers`' continuous batching (`ContinuousBatchingManager`, the machinery behind
  `generate_batch`, used directly because `generate_batch` takes one max_new_tokens for all requests),
  --batch requests per batch at most, its paged cache sized for them. When it fails on this device the
  script prints why and goes on.

Each mode is timed --repeats times after one warm-up (median reported); tokens of every mode are compared
with the continuous mode's, request by request (greedy: they must be the same, except `hf`, which does not
apply alignloop's vocabulary mask — a fresh model may pick a masked token there).
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's alignloop, even where an editable install points at another
sys.path.insert(0, str(ROOT / "benchmarks"))
from alignloop.engine import Engine
from alignloop.model import pick_device
from genbench import hf_continuous, in_turns, load, prompts as chat_prompts

def old_engine_module(rev: str):
    """alignloop/engine.py as it was at `rev` (static batching), imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:alignloop/engine.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    path = Path(tempfile.mkdtemp()) / "alignloop_engine_static.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("alignloop_engine_static", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--ctx", type=int, default=512, help="context of the fresh model (answers up to --max-new fit)")
    ap.add_argument("--model", default="", help="a Hugging Face folder or .gguf file instead of a fresh model")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="slots (continuous) / rows per batch (static)")
    ap.add_argument("--min-new", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--modes", default="continuous,static,chunked,hf")
    ap.add_argument("--static-rev", default="9938be8", help="the git revision of the static-batching engine")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = pick_device(args.device)
    tok, model, args.size = load(args, device, ctx=args.ctx)
    tok.stop_ids = []  # no end of turn: every answer runs to its own length, on every side
    rng = random.Random(args.seed)
    prompts = chat_prompts(tok, args.requests)
    budgets = [rng.randint(args.min_new, args.max_new) for _ in prompts]
    ctx = model.config.max_position_embeddings
    budgets = [min(n, ctx - len(p)) for n, p in zip(budgets, prompts)]
    useful = sum(budgets)
    print(f"{len(prompts)} requests, answers of {min(budgets)}..{max(budgets)} tokens ({useful} in all), "
          f"batch {args.batch}, {args.size}, {device}, {torch.get_num_threads()} threads")

    engine = Engine(model, tok, device, max_batch=args.batch)
    tokens: dict[str, list[list[int]]] = {}

    def continuous():
        outs = engine.generate(prompts, max_new_tokens=budgets, temperature=0)
        tokens["continuous"] = [o.ids for o in outs]

    def chunked():
        got = []
        for s in range(0, len(prompts), args.batch):
            chunk = budgets[s: s + args.batch]
            outs = engine.generate(prompts[s: s + args.batch], max_new_tokens=max(chunk), temperature=0)
            got += [o.ids[:n] for o, n in zip(outs, chunk)]
        tokens["chunked"] = got

    static_engine = None

    def static():
        nonlocal static_engine
        if static_engine is None:
            static_engine = old_engine_module(args.static_rev).Engine(model, tok, device, max_batch=args.batch)
        outs = static_engine.generate(prompts, max_new_tokens=budgets, temperature=0)
        tokens["static"] = [o.ids for o in outs]

    def hf():
        tokens["hf"] = hf_continuous(model, tok, prompts, budgets, args.batch)

    modes = {"continuous": continuous, "static": static, "chunked": chunked, "hf": hf}
    rates = {}
    for name, (best, runs, _) in in_turns({n: modes[n] for n in args.modes.split(",")}, args.repeats, device,
                                          width=10).items():
        rates[name] = useful / best
        lengths_ok = all(len(t) == n for t, n in zip(tokens[name], budgets))
        same = sum(a == b for a, b in zip(tokens[name], tokens.get("continuous", tokens[name])))
        print(f"{name:>10}: {useful} tokens in {best:.3f} s (median of {runs}) = {useful / best:,.0f} tokens/s;"
              f" lengths {'as asked' if lengths_ok else 'WRONG'}; same tokens as continuous: {same} of {len(prompts)}")
    if "continuous" in rates:
        for name, r in rates.items():
            if name != "continuous":
                print(f"continuous / {name}: {rates['continuous'] / r:.2f}x")


if __name__ == "__main__":
    main()
