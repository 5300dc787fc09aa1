"""Pretraining throughput, one process against torchrun (DDP) on this machine's CPU cores.

    python benchmarks/dist_pretrain.py [--steps 200] [--nproc 2] [--preset tiny] [--fsdp] [--keep DIR]

Runs the real command line, `alignloop pretrain --preset tiny --max-steps N`, as one process with every
core, then under `torchrun --nproc_per_node P` with cores / P threads each (the same cores in all), on the
same data, seed and global batch (`--batch-size` is global: each process takes its share of every
micro-batch). Prints tokens/s side by side: the median of the training steps after the first fifth
(held-out evaluation and checkpoint steps left out), and each command's wall time (start-up, the
process group, the final save included). The two runs learn the same thing: their last losses are printed
too (DDP equals one process to ~1e-4). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alignloop(args: list[str], nproc: int, threads: int) -> float:
    """Run `alignloop ARGS` as `nproc` processes of `threads` threads; its wall time in seconds."""
    launch = [sys.executable, "-m", "alignloop"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "alignloop"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ALIGNLOOP_QUIET": "1"}
    t = time.perf_counter()
    proc = subprocess.run(launch + args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"alignloop {' '.join(args)} ({nproc} processes) failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def steady(stage: Path, every: int) -> tuple[float, float, int]:
    """(median tokens/s after the first fifth of the steps, last loss, steps) from a stage's metrics.jsonl.
    Steps that also evaluated or checkpointed are left out: their time is not training."""
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    train = [r for r in rows[len(rows) // 5:] if r["step"] % every] or rows
    return statistics.median(r["tokens_per_s"] for r in train), rows[-1]["loss"], len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    ap.add_argument("--preset", default="tiny", choices=("micro", "tiny", "small"))
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="cores to use in all (default: all)")
    ap.add_argument("--fsdp", action="store_true", help="also time FSDP2 under torchrun")
    ap.add_argument("--keep", metavar="DIR", help="build the runs here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    if args.nproc < 2 or args.cores < args.nproc:
        sys.exit("--nproc must be at least 2, and --cores at least --nproc")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dist-pretrain-"))
    data = base / "data"
    if not (data / "tokenizer" / "tokenizer.json").exists():
        for stage in ("world", "tokenizer"):
            alignloop([stage, "--preset", args.preset, "--out", str(data)], 1, args.cores)
    every = args.steps + 1  # no held-out evaluation nor checkpoint on the way (one at the end)
    common = ["pretrain", "--preset", args.preset, "--max-steps", str(args.steps), "--data", str(data / "world" / "corpus.jsonl"),
              "--tokenizer", str(data / "tokenizer"), "--eval-every", str(every), "--checkpoint-every", str(every),
              "--sample-every", "0", "--restart"]
    runs = [("1 process", 1, args.cores, []), (f"DDP × {args.nproc}", args.nproc, args.cores // args.nproc, [])]
    if args.fsdp:
        runs.append((f"FSDP2 × {args.nproc}", args.nproc, args.cores // args.nproc, ["--fsdp"]))
    print(f"{args.preset} preset, {args.steps} steps, same global batch; {args.cores} cores in all")
    print(f"{'':<14}{'threads/proc':>13}{'tokens/s':>12}{'vs 1 proc':>11}{'wall s':>9}{'last loss':>11}")
    first = None
    for name, nproc, threads, extra in runs:
        out = base / name.split()[0].lower()
        wall = alignloop([*common, "--out", str(out), *extra], nproc, threads)
        tps, loss, steps = steady(out / "pretrain", every)
        first = first or tps
        print(f"{name:<14}{threads:>13}{tps:>12,.0f}{tps / first:>10.2f}×{wall:>9.1f}{loss:>11.4f}")
    if not args.keep:
        print(f"(runs in {base}; --keep DIR to choose where)")


if __name__ == "__main__":
    main()
