"""Pretraining throughput: tokens per second (and model FLOPs utilisation on a GPU).

    python benchmarks/pretrain_speed.py [--size tiny] [--seq-len 128] [--batch 16] [--steps 30] [--compile]

A fresh model of the size preset trains on random tokens (the speed does not depend on the text);
the first steps (warm-up, compilation) are left out of the figure.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignloop import precision  # noqa: E402
from alignloop.model import create_causal_lm, flops_per_token, n_params, pick_device  # noqa: E402
from alignloop.tokenizer import train_tokenizer  # noqa: E402
from alignloop.train import loop as L  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = pick_device(args.device)
    words = [f"w{i}" for i in range(args.vocab)]
    tok = train_tokenizer([" ".join(words)] * 3, vocab_size=args.vocab, min_frequency=1)
    model = create_causal_lm(args.size, tok).to(device).train()
    if args.compile:
        model.compile()
    opt = L.make_optimizer(model, 1e-3, 0.1)
    x = torch.randint(0, tok.vocab_size, (args.batch, args.seq_len + 1), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with precision.autocast(device, args.dtype):
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    tps = args.batch * args.seq_len / dt
    peak = L.peak_flops(device)
    mfu = f", MFU {flops_per_token(model, args.seq_len) * tps / peak:.1%}" if peak else ""
    print(f"{args.size}: {n_params(model, False) / 1e6:.1f}M parameters, batch {args.batch}×{args.seq_len}, {device}, "
          f"{torch.get_num_threads()} threads: {tps:,.0f} tokens/s{mfu}")


if __name__ == "__main__":
    main()
