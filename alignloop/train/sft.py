"""Step 1 — supervised fine-tuning on demonstrations (`alignloop sft`).

load demonstrations → render with the one chat format → pack into rows (block-diagonal attention,
positions restarting per conversation, loss on assistant tokens only) → train with held-out loss and
early stopping, optionally mixing in pretraining text → save the best model.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignloop import dist
from alignloop import precision
from alignloop.config import Resumable, option
from alignloop.errors import InputError
from alignloop.io import read_records
from alignloop.rundir import resolve_path, save_stage_config
from alignloop.tokenizer import ChatTokenizer, validate_messages
from alignloop.train import loop
from alignloop.train.data import check_vocab, load_corpus, resolve_init, rows_of

SECTION = "sft"
IGNORE = -100


@dataclass
class Config(Resumable):
    data: str = option("", "demonstrations file (default: the run's world/demonstrations.jsonl)")
    init: str = option("", "model to fine-tune: a Hugging Face folder or a .gguf file (default: the run's pretrain/)")
    chat_format: str = option("template", "template: the tokenizer's own chat template; alignloop: add alignloop's "
                              "chat tokens and template (for a base model that has none; its embeddings grow)",
                              choices=("template", "alignloop"))
    prompt_field: str = option("", "field mapping for other shapes: the user turn, e.g. 'instruction'")
    input_field: str = option("", "field mapping: appended to the user turn, e.g. 'instances[].input'")
    completion_field: str = option("", "field mapping: the assistant turn, e.g. 'instances[].output'")
    seq_len: int = option(256, "tokens per packed row; longer conversations are left out (counted)", min=16)
    batch_size: int = option(8, "packed rows per micro-batch", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    epochs: int = option(16, "passes over the demonstrations (InstructGPT: 16)", min=1)
    lr: float = option(5e-4, "peak learning rate", min=0.0, max=1.0)
    min_lr_ratio: float = option(0.1, "final LR as a fraction of the peak", min=0.0, max=1.0)
    warmup_steps: int = option(10, "linear warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    val_fraction: float = option(0.1, "share of demonstrations held out for the early-stopping loss", min=0.0, max=0.5)
    patience: int = option(3, "stop after this many evaluations without a better held-out loss (0: never)", min=0)
    ptx_fraction: float = option(0.1, "share of rows that are pretraining text (InstructGPT-style mix; 0: none)", min=0.0, max=0.9)
    ptx_data: str = option("", "pretraining text for the mix (default: the run's world/corpus.jsonl)")
    checkpoint_every: int = option(100, "write a checkpoint every N steps", min=1)
    compile: bool = option(False, "torch.compile the model (fixed shapes; worth it on a GPU)")


PRESETS = {
    "micro": dict(seq_len=128, batch_size=4, epochs=4, lr=1e-3),
    # rows of 2: 150 demonstrations pack into ~15 rows, so batches of 8 gave 16 steps in all and a model that
    # had not learnt to end its turn (dev gold 0.457 vs 0.661 with 2; docs/LOG.md, tuned on dev)
    "tiny": dict(batch_size=2),
    "small": dict(seq_len=1024, batch_size=16, lr=1e-4, compile=True),
}


# ---------------------------------------------------------------- reading demonstrations


def _get(rec, path: str, file, line):
    """A field by dotted path; `name[]` expands a list (one conversation per element), `name[0]` indexes."""
    values = [rec]
    for part in path.split("."):
        m = re.fullmatch(r"(\w+)(\[(\d*)\])?", part)
        if not m:
            raise InputError(f"bad field path {path!r}", field=path)
        nxt = []
        for v in values:
            if not isinstance(v, dict) or m.group(1) not in v:
                raise InputError("missing field", file=file, line=line, field=path)
            v = v[m.group(1)]
            if m.group(2) is None:
                nxt.append(v)
            elif not isinstance(v, list):
                raise InputError("expected a list", file=file, line=line, field=path)
            elif m.group(3) == "":
                nxt.extend(v)
            else:
                nxt.append(v[int(m.group(3))] if int(m.group(3)) < len(v) else "")
        values = nxt
    return values


def conversations(path: Path, cfg: Config) -> list[list[dict]]:
    """Every supported shape → conversations that end with an assistant turn."""
    out = []
    for line, rec in read_records(path):
        if cfg.completion_field:
            prompts = _get(rec, cfg.prompt_field, path, line) if cfg.prompt_field else [""]
            inputs = _get(rec, cfg.input_field, path, line) if cfg.input_field else []
            answers = _get(rec, cfg.completion_field, path, line)
            for i, answer in enumerate(answers):
                user = str(prompts[min(i, len(prompts) - 1)]).strip()
                extra = str(inputs[i]).strip() if i < len(inputs) and inputs[i] else ""
                user = f"{user}\n\n{extra}" if user and extra else (user or extra)
                msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(answer)}]
                out.append(validate_messages(msgs, path, line))
            continue
        if "messages" in rec:
            msgs = validate_messages(rec["messages"], path, line)
        elif "prompt" in rec and "completion" in rec:
            p = rec["prompt"]
            msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
            msgs = validate_messages(msgs + [{"role": "assistant", "content": rec["completion"]}], path, line)
        else:
            raise InputError("expected 'messages', or 'prompt' and 'completion' (or give --completion-field "
                             "for another shape)", file=path, line=line, field="messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError("the demonstration has no assistant turn", file=path, line=line, field="messages")
        out.append(msgs)
    return out


# ---------------------------------------------------------------- packing


def encode(tok: ChatTokenizer, conv: list[dict]) -> tuple[list[int], list[int]]:
    """(inputs, targets): targets are the next tokens where the loss mask is on, IGNORE elsewhere."""
    ids, mask = tok.render(conv)
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """Greedy packing into rows of seq_len. Returns input ids, targets, positions and segment ids (B, T);
    segment −1 marks padding. Attention is confined to a segment (see `block_mask`)."""
    rows, cur = [], []
    for ex in examples:
        if cur and sum(len(e[0]) for e in cur) + len(ex[0]) > seq_len:
            rows.append(cur)
            cur = []
        cur.append(ex)
    if cur:
        rows.append(cur)
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    tgt = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        o = 0
        for s, (x, y) in enumerate(row):
            n = len(x)
            ids[b, o:o + n], tgt[b, o:o + n] = torch.tensor(x), torch.tensor(y)
            pos[b, o:o + n], seg[b, o:o + n] = torch.arange(n), s
            o += n
    return ids, tgt, pos, seg


def block_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: causal within a segment; a padding slot sees only itself."""
    T = seg.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=seg.device))
    same = seg[:, :, None] == seg[:, None, :]
    return ((same & causal) | torch.eye(T, dtype=torch.bool, device=seg.device))[:, None]


def packed_loss(model, ids, tgt, pos, seg, n_global: int | None = None) -> torch.Tensor:
    """Mean loss over the learned tokens; with `n_global`, these rows' summed loss / n_global (their share
    of the mean over a global batch of which they are one rank's part)."""
    logits = model(input_ids=ids, attention_mask=block_mask(seg), position_ids=pos).logits
    if n_global is None:
        return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE,
                           reduction="sum") / max(1, n_global)


@torch.no_grad()
def held_out_loss(model, data, device, cfg) -> float:
    """Loss over every learned held-out token. Under torchrun each rank scores its share of every batch
    (one left without a row scores one and counts nothing: the ranks run the same forward passes)."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # (loss summed over learned tokens, learned tokens)
    for i in range(0, len(data[0]), cfg.batch_size):
        mine = dist.part(torch.arange(i, min(i + cfg.batch_size, len(data[0]))))
        weight = 1.0 if len(mine) else 0.0
        ids, tgt, pos, seg = (t[mine if len(mine) else [i]].to(device) for t in data)
        with precision.autocast(device, cfg.dtype):
            logits = model(input_ids=ids, attention_mask=block_mask(seg), position_ids=pos).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")
        sums += torch.tensor([loss.item(), int((tgt != IGNORE).sum())], dtype=torch.float64) * weight
    total, count = dist.all_sum(sums).tolist()
    model.train()
    return total / max(1, count)


# ---------------------------------------------------------------- the stage


def run(cfg: Config, out: Path) -> Path:
    from alignloop.model import load_causal_lm, n_params, save_model

    data_path = resolve_path(cfg.data, out, "world/demonstrations.jsonl")
    init = resolve_init(cfg.init, out) if cfg.init else out / "pretrain"
    convs = conversations(data_path, cfg)          # bad input stops here, before any work
    tok = _tokenizer(cfg, out, init)
    train, val, train_rows, val_rows = _rows(cfg, out, tok, convs, data_path)

    device = dist.setup(cfg)
    dist.check_rows(cfg.batch_size, "a micro-batch (--batch-size)", "batch_size")
    model = load_causal_lm(init)
    if model.config.vocab_size < tok.vocab_size:  # --chat-format alignloop added tokens
        from alignloop.model import pad_vocab
        model.resize_token_embeddings(pad_vocab(tok.vocab_size), mean_resizing=True)
    model.to(device).train()
    n_par = n_params(model, False)
    model = dist.wrap(model, cfg.fsdp, device, cfg.dtype)
    opt = loop.make_optimizer(model, cfg.lr, cfg.weight_decay)
    stage = out / SECTION
    ckpts = loop.Checkpoints(stage)
    steps_per_epoch = max(1, len(train_rows[0]) // (cfg.batch_size * cfg.grad_accum))
    max_steps = steps_per_epoch * cfg.epochs
    start, best, bad_evals = 0, float("inf"), 0
    best_state = None
    state = ckpts.load() if cfg.resume else None
    if state is not None:
        dist.restore(state, model, opt)
        start, best, bad_evals, best_state = state["step"], state["best"], state["bad_evals"], state["best_state"]
    # Only rank 0 writes (the metrics log, config.toml, checkpoints, the model).
    metrics = loop.Metrics(stage, resume_step=start if state is not None else None) if dist.is_main() else None
    if dist.is_main():
        save_stage_config(out, SECTION, cfg)
    if cfg.compile:
        model.compile()
    print(f"sft: {len(train)} demonstrations in {len(train_rows[0])} packed rows (+{len(val)} held out), "
          f"{n_par / 1e6:.2f}M parameters, {max_steps} steps"
          + (f", {dist.world()} processes ({'FSDP2' if cfg.fsdp else 'DDP'})" if dist.world() > 1 else ""))
    sampler = loop.RowSampler(len(train_rows[0]), cfg.batch_size, cfg.seed)
    bar = loop.Progress(max_steps, "sft", start)
    for step in range(start, max_steps):
        loop.set_lr(opt, loop.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            idx = sampler.indices(step * cfg.grad_accum + micro)
            # this rank's rows of the global micro-batch; its loss is its share of the mean over the whole
            # micro-batch's learned tokens, × world because DDP and FSDP average the ranks' gradients
            n_learned = int((train_rows[1][idx] != IGNORE).sum())
            batch = [t[dist.part(idx)].to(device, non_blocking=True) for t in train_rows]
            with dist.grad_sync(model, micro == cfg.grad_accum - 1):
                with precision.autocast(device, cfg.dtype):
                    loss = packed_loss(model, *batch, n_global=n_learned)
                (loss * dist.world() / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "loss": dist.all_sum(loss_sum).item() / cfg.grad_accum, "lr": opt.param_groups[0]["lr"]}
        end_of_epoch = (step + 1) % steps_per_epoch == 0
        stop = False
        if end_of_epoch and val_rows is not None:
            rec["val_loss"] = held_out_loss(model, val_rows, device, cfg)
            if rec["val_loss"] < best - 1e-4:
                best, bad_evals = rec["val_loss"], 0
                best_state = dist.model_state(model)  # the whole model, on rank 0 (a collective under FSDP)
            else:
                bad_evals += 1
                stop = cfg.patience > 0 and bad_evals >= cfg.patience
            bar.write(f"epoch {(step + 1) // steps_per_epoch}: loss {rec['loss']:.3f}, held-out {rec['val_loss']:.3f}"
                      + (" (early stop)" if stop else ""))
        if metrics:
            metrics.log(**rec)
        bar.update(1, loss=rec["loss"])
        if (step + 1) % cfg.checkpoint_every == 0 or stop or step + 1 == max_steps:
            state = dist.capture(model, opt)  # gathered to rank 0 (a collective under FSDP)
            if dist.is_main():
                ckpts.save(step + 1, best=best, bad_evals=bad_evals, best_state=best_state, **state)
        if stop:
            break
    bar.close()
    model = dist.gathered(model)  # rank 0: the whole plain model; the other ranks are done
    if not dist.is_main():
        return stage
    if best_state is not None:  # early stopping keeps the best held-out model, not the last
        model.load_state_dict(best_state)
    save_model(model, tok, stage)
    print(f"sft: best held-out loss {best:.4f} → {stage}" if best < float("inf") else f"sft: → {stage}")
    print(f"sft: peak memory {loop.peak_memory_gb(device):.2f} GB")
    return stage


def _tokenizer(cfg: Config, out: Path, init: Path) -> ChatTokenizer:
    """The tokenizer of the model `init` (else the run's), checked against its embeddings; with
    `--chat-format alignloop`, alignloop's chat tokens and template added."""
    from alignloop.sources import tokenizer_dir
    from alignloop.tokenizer import with_chat_format
    tok_dir = tokenizer_dir(init, out)
    tok = ChatTokenizer.load(tok_dir)
    check_vocab(init, tok, tok_dir)
    if cfg.chat_format == "alignloop":
        tok = with_chat_format(tok)
    elif not tok.has_chat:
        raise InputError(f"{tok_dir} has no chat template: give --chat-format alignloop to fine-tune this base model "
                         "on alignloop's chat format", file=tok_dir, field="chat_template")
    return tok


def _rows(cfg: Config, out: Path, tok: ChatTokenizer, convs: list[list[dict]], data_path: Path):
    """(training examples, held-out examples, training rows, held-out rows or None): the demonstrations that
    fit a row, shuffled and split, each side packed (`pack`); pretraining rows mixed into training."""
    examples = [encode(tok, c) for c in convs]
    fits = [e for e in examples if len(e[0]) <= cfg.seq_len]
    if len(fits) < len(examples):
        print(f"sft: {len(examples) - len(fits)} of {len(examples)} demonstrations are longer than the "
              f"{cfg.seq_len}-token rows and were left out")
    if not fits:
        raise InputError(f"no demonstration fits in {cfg.seq_len} tokens", file=data_path, field="seq_len")
    rng = random.Random(cfg.seed)
    rng.shuffle(fits)
    n_val = int(len(fits) * cfg.val_fraction) if len(fits) >= 10 else 0
    val, train = fits[:n_val], fits[n_val:]
    train_rows = pack(train, cfg.seq_len, tok.pad_id)
    val_rows = pack(val, cfg.seq_len, tok.pad_id) if val else None
    return train, val, _with_ptx(cfg, out, tok, train_rows), val_rows


def _with_ptx(cfg: Config, out: Path, tok: ChatTokenizer, train_rows: tuple) -> tuple:
    """`train_rows` and pretraining rows, `ptx_fraction` of them all (every token learned, one segment per row)."""
    ptx_path = resolve_path(cfg.ptx_data, out, "world/corpus.jsonl")
    if cfg.ptx_fraction > 0 and not cfg.ptx_data and not ptx_path.exists():
        print("sft: no pretraining text to mix in (no --ptx-data and no world corpus in the run): demonstrations only")
    elif cfg.ptx_fraction > 0:
        ptx_ids, _, _, _ = load_corpus(ptx_path, tok, 0.0)
        ptx = rows_of(ptx_ids, cfg.seq_len)
        n_ptx = min(len(ptx), int(len(train_rows[0]) * cfg.ptx_fraction / (1 - cfg.ptx_fraction)))
        if n_ptx:
            pick = torch.randperm(len(ptx), generator=torch.Generator().manual_seed(cfg.seed))[:n_ptx]
            p = ptx[pick]
            extra = (p[:, :-1], p[:, 1:], torch.arange(cfg.seq_len).expand(n_ptx, -1), torch.zeros_like(p[:, :-1]))
            train_rows = tuple(torch.cat([a, b]) for a, b in zip(train_rows, extra))
    return train_rows
