"""The engine's decode step against its own matrix products (issue 15's "within 1.5× of its matmul time").

Decodes `--new` tokens for `--batch` rows of the same prompts (greedy, end of turn banned, as
engine_vs_generate.py) and reports, for the decode steps:
  plain     — milliseconds a step, timed without a profiler (median of `--repeats` calls);
  profiled  — under `torch.profiler`: the self time of every operator, the part in matrix products
              (mm, addmm, bmm, baddbmm, linear's kernels) and the ratio total / products — the issue's
              measure — with the operators that take the rest, largest first.
The profiler adds a fixed cost to every operator, so the profiled ratio is the fairer one for a step of
many small operations (it counts each operator's own time); the plain time is what a user waits.

    python benchmarks/step_profile.py --size tiny --batch 64 --new 48
    python benchmarks/step_profile.py --model $(bash scripts/get-smollm2.sh) --batch 32 --new 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from genbench import load, prompts as chat_prompts  # noqa: E402

from alignloop.engine import Engine  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="a fresh Llama of this preset size (without --model)")
    p.add_argument("--model", default="", help="a Hugging Face folder or .gguf file instead")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new", type=int, default=48, help="new tokens a row (end of turn banned)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--top", type=int, default=12, help="operators to list besides the products")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    tok, model, name = load(args, device)
    tok.stop_ids = []  # every row decodes exactly --new tokens
    prompts = chat_prompts(tok, args.batch)
    engine = Engine(model, tok, device, max_batch=args.batch)
    gen = lambda: engine.generate(prompts, max_new_tokens=args.new, temperature=0)  # noqa: E731
    gen()  # warm-up: the fused weights, the cache, the allocator

    # the first step of a call carries the prompts' prefill; the decode step is what is asked: time
    # `new` tokens and 1 token and take the difference
    def call(n):
        t = time.perf_counter()
        engine.generate(prompts, max_new_tokens=n, temperature=0)
        return time.perf_counter() - t
    full, one = [], []
    for _ in range(args.repeats):  # in turns, so that the machine's drift falls on both
        full.append(call(args.new))
        one.append(call(1))
    step_ms = (statistics.median(full) - statistics.median(one)) / (args.new - 1) * 1e3

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof_full:
        gen()
    with profile(activities=[ProfilerActivity.CPU]) as prof_one:
        engine.generate(prompts, max_new_tokens=1, temperature=0)

    def self_times(prof):
        return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
    a, b = self_times(prof_full), self_times(prof_one)
    decode = {k: (us - b.get(k, (0, 0))[0], n - b.get(k, (0, 0))[1]) for k, (us, n) in a.items()}
    total = sum(us for us, _ in decode.values())
    products = sum(us for k, (us, _) in decode.items() if k in MATMUL)
    steps = args.new - 1
    print(f"model {name}, batch {args.batch}, {args.new} new tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"plain: {step_ms:.2f} ms a decode step (median of {args.repeats}, {args.new} tokens minus 1)")
    print(f"profiled: {total / steps / 1e3:.2f} ms a step, of which matrix products {products / steps / 1e3:.2f} ms "
          f"→ step / products = {total / products:.2f}×")
    print(f"operators a step: {sum(n for _, n in decode.values()) / steps:.0f}")
    print(f"\n{'operator':<34} {'µs a step':>10} {'calls a step':>13}")
    rest = sorted(((us, k, n) for k, (us, n) in decode.items() if k not in MATMUL), reverse=True)
    for us, k, n in rest[: args.top]:
        print(f"{k:<34} {us / steps:>10.1f} {n / steps:>13.1f}")


if __name__ == "__main__":
    main()
