"""Step 0 — pretraining: next-token prediction on a corpus (`alignloop pretrain`).

load data → tokenize → pack into fixed-length rows → build or load the model → step → evaluate
(held-out loss, bits per byte) → sample → checkpoint → save a Hugging Face folder.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignloop import dist
from alignloop import precision
from alignloop.config import Resumable, option
from alignloop.errors import InputError
from alignloop.model import SIZES
from alignloop.rundir import resolve_path, save_stage_config
from alignloop.tokenizer import ChatTokenizer
from alignloop.train import loop
from alignloop.train.data import check_vocab, load_corpus, resolve_init, rows_of

SECTION = "pretrain"


@dataclass
class Config(Resumable):
    data: str = option("", "corpus: .txt/.jsonl/.json/.parquet or a datasets folder (default: the run's world/corpus.jsonl)")
    tokenizer: str = option("", "tokenizer folder (default: the run's tokenizer/)")
    init: str = option("", "continue from this Hugging Face causal-LM folder instead of a fresh model")
    size: str = option("tiny", "model size preset for a fresh model", choices=tuple(SIZES))
    seq_len: int = option(256, "tokens per training row", min=8, max=131072)
    batch_size: int = option(16, "rows per micro-batch", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    max_steps: int = option(1200, "optimizer steps", min=1)
    max_seconds: float = option(0.0, "stop after this many seconds of training and decay the LR to fit (0: off)", min=0)
    lr: float = option(3e-3, "peak learning rate", min=0.0, max=1.0)
    min_lr_ratio: float = option(0.1, "final LR as a fraction of the peak (cosine decay)", min=0.0, max=1.0)
    warmup_steps: int = option(50, "linear warm-up steps", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    val_fraction: float = option(0.05, "held-out share: the file's tail for one text, else the last documents", min=0.0, max=0.5)
    eval_every: int = option(200, "evaluate held-out loss every N steps", min=1)
    sample_every: int = option(400, "print sample generations every N steps (0: never)", min=0)
    checkpoint_every: int = option(200, "write a checkpoint every N steps", min=1)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", min=1)
    compile: bool = option(False, "torch.compile the model (fixed shapes; worth it on a GPU)")


PRESETS = {
    "micro": dict(size="micro", seq_len=64, batch_size=8, max_steps=60, lr=3e-3, warmup_steps=5,
                  eval_every=20, sample_every=0, checkpoint_every=20),
    # ~3.5 minutes on 2 CPU cores: ~18 passes over the world's corpus, enough to memorise its facts
    # (fact recall 74% after 700 steps, 84% after 1000, 90% after 1200: docs/LOG.md).
    # No weight decay: memorising facts is the point of this stage here.
    "tiny": dict(size="tiny", seq_len=128, batch_size=16, max_steps=1200, lr=4e-3, weight_decay=0.0,
                 warmup_steps=30, eval_every=100, sample_every=350, checkpoint_every=100),
    "small": dict(size="small", seq_len=1024, batch_size=32, grad_accum=4, max_steps=5000, lr=6e-4,
                  warmup_steps=200, eval_every=250, sample_every=1000, checkpoint_every=500, compile=True),
}


@torch.no_grad()
def evaluate(model, val_rows: torch.Tensor, device, cfg, val_bytes: int, val_chars: int) -> dict:
    """Held-out loss over every held-out token; bits per byte and per character of the held-out text.
    Under torchrun each rank scores its share of every batch (a rank left without a row scores one and
    counts nothing: every rank must run the same forward passes) and the sums are added up."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # (loss summed over tokens, tokens)
    for i in range(0, len(val_rows), cfg.batch_size):
        rows = dist.part(val_rows[i: i + cfg.batch_size])
        weight = 1.0 if len(rows) else 0.0
        rows = (rows if len(rows) else val_rows[i: i + 1]).to(device)
        with precision.autocast(device, cfg.dtype):
            logits = model(input_ids=rows[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        sums += torch.tensor([loss.item(), rows[:, 1:].numel()], dtype=torch.float64) * weight
    total, count = dist.all_sum(sums).tolist()
    model.train()
    # The held-out rows cover `count` of the held-out tokens; scale the text size to the same share.
    n_val_tokens = len(val_rows) * val_rows.shape[1] if len(val_rows) else 1
    share = count / max(1, n_val_tokens)
    bits = total / math.log(2)
    return {"val_loss": total / max(1, count), "val_bpb": bits / max(1, val_bytes * share),
            "val_bpc": bits / max(1, val_chars * share)}


def run(cfg: Config, out: Path) -> Path:
    from alignloop.model import create_causal_lm, flops_per_token, load_causal_lm, n_params, save_model

    data_path = resolve_path(cfg.data, out, "world/corpus.jsonl")
    init = resolve_init(cfg.init, out) if cfg.init else None
    # --init without --tokenizer: the model's own tokenizer (a 49k-vocabulary model with the run's 4k BPE
    # would train on the wrong ids); a fresh model uses the run's.
    from alignloop.sources import TOKENIZER_FILES
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else init if init and any((init / f).exists() for f in TOKENIZER_FILES) \
        else out / "tokenizer"
    tok = ChatTokenizer.load(tok_dir)
    if init:
        check_vocab(init, tok, tok_dir)
    stage = out / SECTION
    train_ids, val_ids, val_bytes, val_chars = load_corpus(data_path, tok, cfg.val_fraction)
    # Validation rows span the whole held-out stream (the final partial row is dropped).
    train_rows, val_rows = rows_of(train_ids, cfg.seq_len), rows_of(val_ids, cfg.seq_len)
    val_tokens_in_rows = len(val_rows) * cfg.seq_len
    if val_tokens_in_rows:  # rescale bytes/chars to the tokens evaluated
        frac = val_tokens_in_rows / max(1, len(val_ids) - 1)
        val_bytes, val_chars = int(val_bytes * frac), int(val_chars * frac)
    if len(train_rows) < 1:
        raise InputError(f"corpus too small: {len(train_ids)} tokens for rows of {cfg.seq_len}", file=data_path)

    device = dist.setup(cfg)
    dist.check_rows(cfg.batch_size, "a micro-batch (--batch-size)", "batch_size")
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(init) if init else create_causal_lm(cfg.size, tok, seed=cfg.seed)
    model.to(device).train()
    flops_tok, peak, n_par = flops_per_token(model, cfg.seq_len), loop.peak_flops(device), n_params(model, False)
    model = dist.wrap(model, cfg.fsdp, device, cfg.dtype)
    opt = loop.make_optimizer(model, cfg.lr, cfg.weight_decay)
    ckpts = loop.Checkpoints(stage, keep=cfg.keep_checkpoints)
    start, elapsed0 = 0, 0.0
    state = ckpts.load() if cfg.resume else None
    if state is not None:
        dist.restore(state, model, opt)
        start, elapsed0 = state["step"], state.get("elapsed", 0.0)
    # Only rank 0 writes (the metrics log, config.toml, checkpoints, the model).
    metrics = loop.Metrics(stage, resume_step=start if state is not None else None) if dist.is_main() else None
    if dist.is_main():
        save_stage_config(out, SECTION, cfg)
    if cfg.compile:
        model.compile()  # in place; training rows have one fixed shape, so it compiles once
    sampler = loop.RowSampler(len(train_rows), cfg.batch_size, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    print(f"pretrain: {n_par / 1e6:.2f}M parameters, {len(train_rows)} rows of {cfg.seq_len} "
          f"({len(train_ids) / 1e6:.2f}M tokens), {len(val_ids)} held-out tokens, device {device}"
          + (f" × {dist.world()} processes ({'FSDP2' if cfg.fsdp else 'DDP'})" if dist.world() > 1 else ""))
    bar = loop.Progress(cfg.max_steps, "pretrain", start)
    timer, last = loop.Timer(), time.perf_counter()

    def clock() -> float:  # with a time budget every rank follows one clock, or one would stop alone
        return dist.same(elapsed0 + timer.elapsed()) if cfg.max_seconds else elapsed0 + timer.elapsed()
    step = start
    for step in range(start, cfg.max_steps):
        # With a time budget the schedule follows whichever budget is nearer its end.
        elapsed = clock()
        progress_step = step if not cfg.max_seconds else max(step, int(cfg.max_steps * elapsed / cfg.max_seconds))
        loop.set_lr(opt, loop.lr_at(progress_step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            # this rank's rows of the global micro-batch; its loss is its share of the global mean, and
            # × world because DDP and FSDP average the ranks' gradients
            rows = train_rows[dist.part(sampler.indices(step * cfg.grad_accum + micro))].to(device, non_blocking=True)
            with dist.grad_sync(model, micro == cfg.grad_accum - 1):
                with precision.autocast(device, cfg.dtype):
                    loss = _lm_loss(model, rows, n_global=cfg.batch_size * cfg.seq_len)
                (loss * dist.world() / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = dist.all_sum(loss_sum).item() / cfg.grad_accum  # the one host sync per step
        now = time.perf_counter()
        dt, last = now - last, now
        tps = tokens_per_step / dt
        rec = {"step": step + 1, "loss": loss_val, "lr": opt.param_groups[0]["lr"], "tokens_per_s": tps,
               "elapsed_s": clock()}
        if peak:  # tps counts every process's tokens: divide by every device's peak
            rec["mfu"] = flops_tok * tps / (peak * dist.world())
        done = step + 1 == cfg.max_steps or (cfg.max_seconds and rec["elapsed_s"] >= cfg.max_seconds)
        if (step + 1) % cfg.eval_every == 0 or done:
            rec |= evaluate(model, val_rows, device, cfg, val_bytes, val_chars) if len(val_rows) else {}
            bar.write(f"step {step + 1}: loss {loss_val:.3f}" + (
                f", held-out {rec['val_loss']:.3f} ({rec['val_bpb']:.3f} bits/byte)" if "val_loss" in rec else ""))
            last = time.perf_counter()  # evaluation time is not training throughput
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not dist.is_fsdp(model):
            if dist.is_main():  # the engine reads whole weights: rank 0 alone, on DDP's full copy (none under FSDP)
                for text in sample_texts(dist.plain(model), tok, device):
                    bar.write(f"  sample: {text!r}")
            last = time.perf_counter()
        if metrics:
            metrics.log(**rec)
        bar.update(1, loss=loss_val, tok_s=int(tps))
        if (step + 1) % cfg.checkpoint_every == 0 or done:
            state = dist.capture(model, opt)  # gathered to rank 0 (a collective under FSDP)
            if dist.is_main():
                ckpts.save(step + 1, elapsed=rec["elapsed_s"], **state)
        if done:
            break
    bar.close()
    final_model = dist.gathered(model)
    if not dist.is_main():
        return stage
    save_model(final_model, tok, stage)
    final = loop.read_jsonl_tolerant(metrics.path)[-1] if metrics.path.exists() else {}
    if "val_loss" in final:
        print(f"pretrain: held-out loss {final['val_loss']:.4f}, {final['val_bpb']:.4f} bits/byte, "
              f"{final['val_bpc']:.4f} bits/char → {stage}")
    print(f"pretrain: peak memory {loop.peak_memory_gb(device):.2f} GB")
    return stage


def _lm_loss(model, rows: torch.Tensor, n_global: int | None = None) -> torch.Tensor:
    """Mean next-token loss; with `n_global`, these rows' summed loss / n_global (their share of a mean
    over a global batch of which they are one rank's part)."""
    logits = model(input_ids=rows[:, :-1]).logits
    if n_global is None:
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(),
                                             reduction="sum") / n_global


def sample_texts(model, tok: ChatTokenizer, device, n_tokens: int = 24) -> list[str]:
    """Greedy continuations of two fixed starts, to watch the model learn."""
    from alignloop.engine import Engine
    starts = ["The capital of", "Quiz night!"]
    prompts = [tok.bos_ids + tok.encode(s) for s in starts]
    outs = Engine(model, tok, device).generate(prompts, max_new_tokens=n_tokens, temperature=0.0)
    return [s + o.text for s, o in zip(starts, outs)]
