"""Step 2 — the reward model (`alignloop reward`).

An LM trunk (from SFT by default) with a scalar head, trained on K-way rankings with InstructGPT's loss
    loss = −1/C(K,2) · Σ_(y_w ≻ y_l) log σ(r(x, y_w) − r(x, y_l))
where all C(K,2) pairs of one prompt form ONE batch element: each completion is scored once (K forward
passes, not K·(K−1)) and the pairs of a prompt are never spread over the epoch, which InstructGPT found
to over-fit. Pairs (`chosen`/`rejected`, Anthropic HH-RLHF strings included) are groups of K = 2
(the files are read and checked in train/pairs.py).
After training a bias is set so that the demonstrations score 0 on average (InstructGPT normalises
the RM before RL); it is kept in the model's config as `reward_bias`.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from alignloop import dist
from alignloop import evaljson
from alignloop import precision
from alignloop.config import Preferences, option
from alignloop.forward import sequence_scores
from alignloop.errors import InputError
from alignloop.io import read_records
from alignloop.rundir import resolve_path, save_stage_config
from alignloop.tokenizer import validate_messages
from alignloop.train import loop
from alignloop.train.data import resolve_init
from alignloop.train.pairs import (Group, by_agreement, default_data, labeler_agreement, parse_sources,
                                   read_comparisons, split_groups, usable)
from alignloop.train.trunk_cache import (bytes_needed, cache_key, cached_scores, frozen_features, load_features,
                                         save_features)

SECTION = "reward"


@dataclass
class Config(Preferences):
    demonstrations: str = option("", "demonstrations whose mean score is set to 0 (default: the run's "
                                 "world/demonstrations.jsonl; 'none' to skip)")
    grouped: bool = option(True, "all pairs of a prompt in one batch element (False: independent shuffled pairs)")
    train_trunk: bool = option(True, "train the trunk too (False: only the scalar head learns)")
    train_layers: int = option(-1, "train only the last N decoder blocks, the final norm and the head (-1: all)", min=-1)
    max_seconds: float = option(0.0, "stop training after this many seconds (0: off; for equal-compute comparisons)", min=0.0)
    cache_gb: float = option(8.0, "with --train-layers N (one process, no LoRA): keep the frozen blocks' output for every "
                             "training sequence in memory, up to this many GB, so each step runs only the top N blocks "
                             "(0: off; the same rewards, several times faster an epoch on a CPU)", min=0.0)
    cache_dir: str = option("", "also write the frozen blocks' output there, named by a hash of the model and the data, "
                            "and read it back in the next run on the same model and data (\"\": memory only)")
    likelihood_gate: bool = option(False, "add to the score Σ over the answer's tokens of a learned gate × the token's "
                                   "log-probability under the model's own LM head (tied embeddings; it starts as "
                                   "SFT's): the head can then check a fact named mid-answer against what the trunk "
                                   "expected there (tiny: gold-order accuracy 0.646 → 0.70, known facts 0.44 → 0.69 "
                                   "on the round-1 policy's answers; docs/LOG.md)")


# tiny: lr 3e-4 over 4 epochs ordered the held-out answers as gold does 0.672 of the time, where lr 1e-3
# over 2 (the earlier preset) gave 0.621, and PPO from it gained +0.033 dev gold instead of +0.016; the
# likelihood gate then took the gold order from 0.66/0.62 (rounds 1/2) to 0.70/0.71 and round 2's dev gain
# from +0.032 to +0.054 (seed 0) and +0.046 to +0.074 (seed 1) (docs/LOG.md). Off by default: a model with
# untied embeddings cannot have it, and on SmolLM2 with HH-RLHF it did not help (0.640 against the plain
# head's 0.655 held-out, the same top 4 blocks and data; docs/benchmarks.md).
PRESETS = {"micro": dict(batch_size=8, epochs=2, warmup_steps=2, lr=1e-3),
           "tiny": dict(lr=3e-4, epochs=4, likelihood_gate=True),
           "small": dict(batch_size=32, lr=1e-5, max_len=1024)}


# ---------------------------------------------------------------- model


def batch_rewards(model, seqs: list[list[int]], pad_id: int, device, max_tokens: int = 4096,
                  starts: list[int] | None = None) -> torch.Tensor:
    """Reward of each whole sequence = the head's output at its last token, plus the gated likelihood of
    the answer from `starts[i]` on for a likelihood-gated model (`forward.sequence_scores`)."""
    return sequence_scores(model, seqs, pad_id, device, max_tokens, starts)


def grouped_loss(rewards: torch.Tensor, groups: list[list[tuple[int, int]]], offsets: list[int],
                 n_global: int | None = None) -> torch.Tensor:
    """Mean over prompts of −mean over its pairs of log σ(r_w − r_l). `rewards` holds every completion of
    every prompt in the batch; prompt g's completions start at offsets[g]. With `n_global`: the sum over
    these prompts / n_global (their share of the mean over a global batch, one rank's part of it)."""
    losses = []
    for pairs, off in zip(groups, offsets):
        if not pairs:
            continue
        w = torch.tensor([off + a for a, _ in pairs], device=rewards.device)
        l_ = torch.tensor([off + b for _, b in pairs], device=rewards.device)
        losses.append(-F.logsigmoid(rewards[w] - rewards[l_]).mean())
    return torch.stack(losses).mean() if n_global is None else torch.stack(losses).sum() / n_global


# ---------------------------------------------------------------- evaluation


def gold_order_accuracy(pairs: list[tuple[int, int]], gold: list[float]) -> tuple[int, int]:
    """(right, counted): of the (preferred, other) pairs whose gold scores differ, how many prefer the
    gold-better one. Pairs of equal gold have no right order and are not counted."""
    counted = [(a, b) for a, b in pairs if gold[a] != gold[b]]
    return sum(gold[a] > gold[b] for a, b in counted), len(counted)


def gold_scores(groups: list[Group], out: Path) -> list[list[float]] | None:
    """The world's noise-free score of every completion of each group; None without a world, or when a
    group's prompt is not one of the world's."""
    if not (out / "world" / "world.json").exists():
        return None
    from alignloop.world import SPLITS, load_world
    world = load_world(out)
    by_id = {p["id"]: p for s in SPLITS for p in world.prompts(s)}
    if not all(g.prompt_id in by_id for g in groups):
        return None
    return [[world.gold_score(by_id[g.prompt_id], c) for c in g.completions] for g in groups]


@torch.no_grad()
def evaluate(model, groups: list[Group], pad_id: int, device, batch_size: int = 64, gold=None) -> dict:
    """Held-out pairwise accuracy, the labelers' agreement on the same pairs, and calibration; with `gold`
    (each group's completions' gold scores) also the RM's and the labelers' accuracy against the
    noise-free gold order."""
    model.eval()
    flat = [s for g in groups for s in g.ids]
    starts = [g.start for g in groups for _ in g.ids]
    scores = []
    for i in range(0, len(flat), batch_size):
        scores += batch_rewards(model, flat[i:i + batch_size], pad_id, device, starts=starts[i:i + batch_size]).tolist()
    model.train()
    margins, correct = [], []
    o = 0
    for g in groups:
        for a, b in g.pairs:
            d = scores[o + a] - scores[o + b]
            margins.append(abs(d))
            correct.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
        o += len(g.completions)
    acc = sum(correct) / len(correct) if correct else float("nan")
    # calibration: accuracy in quartiles of |margin| (a calibrated RM is surer where it is right)
    calib = []
    if correct:
        order = sorted(range(len(margins)), key=lambda i: margins[i])
        for q in range(4):
            idx = order[q * len(order) // 4:(q + 1) * len(order) // 4]
            if idx:
                calib.append({"margin_from": margins[idx[0]], "margin_to": margins[idx[-1]],
                              "accuracy": sum(correct[i] for i in idx) / len(idx), "n": len(idx)})
    res = {"pair_accuracy": acc, "n_pairs": len(correct), "labeler_agreement": labeler_agreement(groups),
           "calibration": calib, "n_prompts": len({json.dumps(g.prompt) for g in groups})}
    if gold is not None:  # each item once (two labelers ranked each held-out prompt): every pair of its completions
        rm = lab = (0, 0)
        items, o = set(), 0
        for g, gs in zip(groups, gold):
            s, o = scores[o:o + len(g.completions)], o + len(g.completions)
            lab = tuple(map(sum, zip(lab, gold_order_accuracy(g.pairs, gs))))
            if (json.dumps(g.prompt), tuple(g.completions)) not in items:
                items.add((json.dumps(g.prompt), tuple(g.completions)))
                by_rm = [(i, j) if s[i] >= s[j] else (j, i) for i in range(len(s)) for j in range(i + 1, len(s))]
                rm = tuple(map(sum, zip(rm, gold_order_accuracy(by_rm, gs))))
        res |= {"gold_accuracy": rm[0] / rm[1] if rm[1] else None, "n_gold_pairs": rm[1],
                "labeler_gold_accuracy": lab[0] / lab[1] if lab[1] else None}
    return res


# ---------------------------------------------------------------- early stopping and the frozen trunk


def early_stop_split(train: list[Group], cfg: Config, stage: str = "reward") -> tuple[list[Group], list[Group]]:
    """With `early_stop`: that share of the training prompts (by a hash of seed and prompt, every record of
    a prompt on one side) is set aside to choose the epoch; else (train, []). (`dpo` splits the same way.)"""
    if not cfg.early_stop:
        return train, []
    if dist.world() > 1:
        raise InputError("--early-stop keeps the best epoch's weights in one process; under torchrun leave it at 0",
                         field="early_stop")
    from alignloop.rank import heldout_prompt
    held = {k for k in {json.dumps(g.prompt) for g in train} if heldout_prompt("early-stop/" + k, cfg.seed, cfg.early_stop)}
    if not held:
        print(f"{stage}: --early-stop {cfg.early_stop:g} set aside no prompt of {len(train)}: every epoch trains, the last is kept")
    return [g for g in train if json.dumps(g.prompt) not in held], [g for g in train if json.dumps(g.prompt) in held]


def cache_frozen(model, groups: list[Group], n_top: int, cfg: Config, pad_id: int, device) -> int | None:
    """Compute the frozen blocks' output for every completion of `groups` once (each `g.feats`), when only
    the top `n_top` blocks learn, in one process, and the cache fits `cache_gb`. Returns the number of
    blocks run once (None: no cache; every step runs the whole model)."""
    seqs = [s for g in groups for s in g.ids]
    from alignloop.forward import unwrap
    m = unwrap(model)
    n_layers = len(getattr(m, m.base_model_prefix).layers)
    if n_top < 0 or n_top >= n_layers or not cfg.cache_gb or dist.world() > 1 or not seqs:
        return None
    # (a likelihood-gated model reads log-probabilities through its LM head, the tied input embedding:
    # frozen with the bottom blocks, so the cached features serve it too — `cached_scores`)
    need = bytes_needed(model, seqs) / 2**30
    if need > cfg.cache_gb:
        print(f"reward: the frozen blocks' output would take {need:.1f} GB (--cache-gb {cfg.cache_gb:g}): "
              "not cached; every step runs all blocks")
        return None
    key = cache_key(model, seqs, n_top, precision.amp_dtype(device, cfg.dtype)) if cfg.cache_dir else None
    feats = load_features(Path(cfg.cache_dir), key) if key else None
    if feats is not None:
        print(f"reward: the bottom {n_layers - n_top} blocks' output read from {Path(cfg.cache_dir) / key}.pt")
    else:
        bar = loop.Progress(len(seqs), f"reward: the bottom {n_layers - n_top} blocks, once")
        with precision.autocast(device, cfg.dtype):
            feats = frozen_features(model, seqs, n_top, pad_id, device, progress=bar.update)
        bar.close()
        if key:
            save_features(Path(cfg.cache_dir), key, feats)
    o = 0
    for g in groups:
        g.feats, o = feats[o:o + len(g.ids)], o + len(g.ids)
    print(f"reward: the bottom {n_layers - n_top} of {n_layers} blocks are frozen: their output for {len(seqs)} "
          f"sequences is kept ({need:.2f} GB), each step runs the top {n_top}")
    return n_layers - n_top


@torch.no_grad()
def held_loss(scores, groups: list[Group], cached, device, dtype) -> float:
    """The grouped loss on the early-stopping prompts (−mean log σ(r_w − r_l), a prompt's pairs averaged)."""
    total = 0.0
    for i in range(0, len(groups), 64):
        part = groups[i:i + 64]
        offsets = [sum(len(g.ids) for g in part[:j]) for j in range(len(part))]
        with precision.autocast(device, dtype):
            r = scores([s for g in part for s in g.ids], [f for g in part for f in g.feats] if cached else [],
                       [g.start for g in part for _ in g.ids])
        total += grouped_loss(r.float(), [g.pairs for g in part], offsets).item() * len(part)
    return total / len(groups)


class Best:
    """The trained weights at the epoch of lowest held-out loss (only the parameters that learn are copied)."""

    def __init__(self, model, stage: str = "reward"):
        self.params, self.stage = [p for p in model.parameters() if p.requires_grad], stage
        self.state, self.epoch, self.loss, self.curve = None, 0, float("inf"), []

    def consider(self, epoch: int, loss: float, bar) -> None:
        self.curve.append(loss)
        if loss < self.loss:
            self.state, self.epoch, self.loss = [p.detach().clone() for p in self.params], epoch, loss
        bar.write(f"{self.stage}: epoch {epoch}: early-stopping loss {loss:.4f} (best: epoch {self.epoch})")

    def restore(self) -> None:
        if self.state is not None:
            for p, s in zip(self.params, self.state):
                p.data.copy_(s)

    def record(self) -> dict:
        return {"best_epoch": self.epoch, "best_loss": self.loss, "loss_per_epoch": self.curve}


# ---------------------------------------------------------------- the stage


def run(cfg: Config, out: Path) -> Path:
    from alignloop.model import load_scalar_model, n_params, save_model
    from alignloop.tokenizer import ChatTokenizer

    sources = parse_sources(cfg.sources)
    paths = [Path(p.strip()) for p in cfg.data.split(",") if p.strip()] if cfg.data else default_data(out, cfg.round, sources)
    print(f"reward: reading {', '.join(map(str, paths))} (sources: {', '.join(sources)}; "
          f"min agreement {cfg.min_agreement:g})")
    groups = [g for p in paths for g in read_comparisons(p, cfg.skip_invalid)]  # bad input stops here, before any work
    demos = read_demonstrations(cfg, out)
    other = [g for g in groups if g.origin and g.origin not in sources]
    groups = by_agreement([g for g in groups if not g.origin or g.origin in sources], cfg.min_agreement)
    if other:
        print(f"reward: {len(other)} comparisons of sources {', '.join(sorted({g.origin for g in other}))} left out "
              f"(add them to --sources to learn from them)")
    init = resolve_init(cfg.init, out) if cfg.init else out / "sft"
    tok = ChatTokenizer.load(init)
    for g in groups:
        g.ids = [tok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
        g.start = len(tok.render_prompt(g.prompt))  # the answers' first token (the likelihood gate reads from it)
    kept = usable(groups, lambda g: max(len(s) for s in g.ids), cfg.max_len, "reward", paths[0])
    train, val = split_groups(kept, cfg)
    device = dist.setup(cfg)
    model = load_scalar_model(init, likelihood_gate=cfg.likelihood_gate).to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_rank:
        model = loop.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, scalar_head=True, seed=cfg.seed)
    else:
        loop.train_top_layers(model, cfg.train_layers if cfg.train_trunk else 0)
    n_top = -1 if cfg.lora_rank or cfg.train_layers < 0 else cfg.train_layers if cfg.train_trunk else 0
    t0 = time.perf_counter()  # the budget (--max-seconds) and the speed count the cache's pass too
    cached = cache_frozen(model, train, n_top, cfg, tok.pad_id, device)  # before the early-stop split: one cache for all
    train, stop = early_stop_split(train, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    units = train if cfg.grouped else [replace(g, pairs=[p]) for g in train for p in g.pairs]
    dist.check_rows(min(cfg.batch_size, len(units)), "a batch of comparisons (--batch-size, or the data)", "batch_size")
    from alignloop.forward import Through
    # under torchrun `net` is DDP or FSDP2 around the scores' forward pass; in one process the model itself
    net = dist.wrap(Through(model), cfg.fsdp, device, cfg.dtype) if dist.world() > 1 else model
    opt = loop.make_optimizer(net, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(units) / cfg.batch_size)
    max_steps = steps_per_epoch * cfg.epochs
    stage = out / f"round-{cfg.round}" / "reward"
    metrics = loop.Metrics(stage) if dist.is_main() else None  # only rank 0 writes
    n_cmp = sum(len(g.pairs) for g in train)
    print(f"reward: {len(train)} prompts / {n_cmp} comparisons to learn ({'grouped K-way' if cfg.grouped else 'shuffled pairs'}), "
          f"{len(val)} held out" + (f", {len(stop)} for early stopping" if stop else "")
          + f", {n_params(model, False) / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M learn)")
    scores = (lambda seqs, fts, starts: cached_scores(model, fts, n_top, device, seqs=seqs, starts=starts)) if cached else \
        (lambda seqs, fts, starts: batch_rewards(net, seqs, tok.pad_id, device, 4096 if dist.world() == 1 else 1 << 60,
                                                 starts))
    rng = random.Random(cfg.seed)
    bar = loop.Progress(max_steps, "reward")
    best = Best(model) if stop else None
    step, n_seen = 0, 0
    for epoch in range(cfg.epochs):
        if cfg.max_seconds and dist.same(time.perf_counter() - t0) >= cfg.max_seconds:  # one clock for all ranks
            break
        order = list(range(len(units)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            if cfg.max_seconds and dist.same(time.perf_counter() - t0) >= cfg.max_seconds:  # one clock for all ranks
                break
            batch = [units[i] for i in order[s:s + cfg.batch_size]]
            loop.set_lr(opt, loop.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, 0.1))
            # this rank's prompts of the global batch (the last batch of an epoch may leave a rank without
            # one: it scores one and counts nothing, as every rank must run the same passes)
            mine = dist.part(batch)
            weight = 1.0 if mine else 0.0
            offsets, seqs, fts, starts = [], [], [], []
            for g in mine or batch[:1]:
                offsets.append(len(seqs))
                # shuffled pairs score only the two completions of their pair
                which = range(len(g.ids)) if cfg.grouped else g.pairs[0]
                seqs += [g.ids[k] for k in which]
                starts += [g.start for _ in which]
                fts += [g.feats[k] for k in which] if cached else []
            pairs = [g.pairs for g in mine or batch[:1]] if cfg.grouped else [[(0, 1)]] * len(offsets)
            with precision.autocast(device, cfg.dtype):
                # under torchrun one forward pass per step (DDP and FSDP count passes across ranks)
                rewards = scores(seqs, fts, starts)
            loss = grouped_loss(rewards, pairs, offsets, n_global=len(batch)) * weight
            (loss * dist.world()).backward()  # × world: DDP and FSDP average the ranks' gradients
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_seen += sum(len(g.pairs) for g in batch) if cfg.grouped else len(batch)
            rec = {"step": step, "epoch": epoch + 1, "loss": dist.all_sum(loss.detach()).item(),
                   "lr": opt.param_groups[0]["lr"], "comparisons_per_s": n_seen / (time.perf_counter() - t0)}
            if metrics:
                metrics.log(**rec)
            bar.update(1, loss=rec["loss"])
        if best:
            model.eval()  # (no dropout in the scores that choose the epoch)
            best.consider(epoch + 1, held_loss(scores, stop, cached, device, cfg.dtype), bar)
            model.train()
    if best:
        best.restore()
    bar.close()
    train_time = time.perf_counter() - t0
    model = dist.gathered(net, model)  # rank 0 evaluates and saves the whole plain model; the other ranks are done
    if not dist.is_main():
        return stage
    model.to(device)
    result = (evaluate(model, val, tok.pad_id, device, gold=gold_scores(val, out)) if val
              else {"pair_accuracy": None, "labeler_agreement": None})
    result |= {"train_seconds": train_time, "n_train_comparisons": n_cmp, "n_train_prompts": len(train),
               "grouped": cfg.grouped, "steps": step, "comparisons_seen": n_seen,
               "comparisons_per_s": n_seen / train_time, "cached_blocks_below": cached,
               "early_stop": best.record() if best else None}
    model = loop.merged(model)
    model.config.reward_bias = -mean_demo_score(model, tok, demos, cfg, device)
    result["reward_bias"] = model.config.reward_bias
    result["peak_memory_gb"] = loop.peak_memory_gb(device)
    save_model(model, tok, stage)
    evaljson.write_stage(stage, result)
    save_stage_config(out, SECTION, cfg)
    print_result(result)
    return stage


def print_result(result: dict) -> None:
    acc, agr = result.get("pair_accuracy"), result.get("labeler_agreement")
    print(f"reward: peak memory {result['peak_memory_gb']:.2f} GB")
    print(f"reward: held-out pair accuracy {acc:.3f} on {result['n_prompts']} prompts never trained on"
          + (f", labelers' agreement on the same pairs {agr:.3f} (accuracy is {acc / agr:.0%} of that ceiling)" if agr else "")
          + (f"; against the noise-free gold order {result['gold_accuracy']:.3f} (labelers {result['labeler_gold_accuracy']:.3f})"
             if result.get("gold_accuracy") is not None else "") if acc is not None else "reward: no held-out data")


def read_demonstrations(cfg: Config, out: Path) -> list[list[dict]]:
    """The conversations whose mean score becomes 0, read (and checked) before any training."""
    if cfg.demonstrations == "none":
        return []
    path = resolve_path(cfg.demonstrations, out, "world/demonstrations.jsonl")
    if not path.exists():
        if cfg.demonstrations:
            raise InputError("demonstrations file not found ('none' to skip the normalisation)", file=path)
        print("reward: no demonstrations to normalise against; bias 0")
        return []
    convs = []
    for line, rec in read_records(path):
        if "messages" in rec:
            msgs = rec["messages"]
        elif "completion" in rec:
            if "prompt" not in rec:
                raise InputError("a completion needs its prompt", file=path, line=line, field="prompt")
            p = rec["prompt"]
            msgs = (p if isinstance(p, list) else [{"role": "user", "content": p}]) + [
                {"role": "assistant", "content": rec["completion"]}]
        else:
            raise InputError("expected 'messages', or 'prompt' and 'completion'", file=path, line=line, field="messages")
        msgs = validate_messages(msgs, path, line)
        if msgs[-1]["role"] == "assistant":
            convs.append(msgs)
    return convs


@torch.no_grad()
def mean_demo_score(model, tok, demos: list[list[dict]], cfg: Config, device) -> float:
    kept = [(ids, len(tok.render_prompt(m[:-1]))) for m, ids in ((m, tok.render(m)[0]) for m in demos) if len(ids) <= cfg.max_len]
    seqs, starts = [k[0] for k in kept], [k[1] for k in kept]
    model.eval()
    scores = [r for i in range(0, len(seqs), 64)
              for r in batch_rewards(model, seqs[i:i + 64], tok.pad_id, device, starts=starts[i:i + 64]).tolist()]
    return sum(scores) / len(scores) if scores else 0.0
