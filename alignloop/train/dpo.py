"""Direct preference optimisation (`alignloop dpo`): the policy learns from the rankings themselves, with
no reward model and no sampling (Rafailov et al. 2023).

The implicit reward of an answer y to a prompt x is
    h(x, y) = β · (log π(y|x) − log π_ref(y|x))
where log π(y|x) is the sum of the answer's token log-probs (its content and its end-of-turn token: what
SFT's loss mask covers), taken from logits over the engine's vocabulary mask (`forward.allowed_tokens`),
so it is the probability of the answer as the engine would sample it. The loss is the reward model's
grouped loss (`reward.grouped_loss`) with h in place of the scalar head:
    loss = mean over prompts of −1/|pairs| · Σ_(y_w ≻ y_l) log σ(h_w − h_l)
All C(K,2) pairs of one prompt are one batch element and each completion goes through the policy ONCE per
step (K forward rows, not K·(K−1)); a pair (`chosen`/`rejected`, HH-RLHF strings included) is K = 2, where
this is exactly the DPO paper's loss −log σ(β·[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]).
The reference log-probs are computed once, before training (π_ref is frozen and the data fixed).
With --micro-batch-size m a step's prompts go through the policy m at a time, each pass's loss being its
prompts' share of the batch mean, so the summed gradient is the whole batch's (memory of m prompts'
activations; tests/test_dpo.py checks the weights against one pass).

Why all pairs and not Plackett–Luce (the DPO paper's K-way form, −Σ_k log softmax of h over the answers
ranked k or lower):
- it is the loss the reward model is trained with on the same records, so "reward model + PPO" and DPO
  differ in the method, not in how a ranking is read (experiments/methods.py compares them);
- a ranking here is not always a total order: tied answers give no pair and an "all bad" ranking none,
  which the pairwise form takes as it comes and Plackett–Luce cannot express;
- with K = 2 (pairs files) the two forms are the same.

β (> 0) sets how far the policy may move: the optimum of the KL-regularised objective that DPO solves is
π ∝ π_ref·exp(r/β), so a small β lets the policy follow the preferences further from the reference (the
paper: 0.1–0.5). β ≤ 0 has no such optimum and is refused.

The reference is the run's sft/ (or --reference); with --lora-rank and the same folder for the policy
and the reference, the reference is the policy with its adapters off (one copy of the weights). The
policy is saved merged into RUN/round-<i>/dpo/, an ordinary Hugging Face folder (`alignloop serve RUN`
lists it as round-<i>/dpo). A short stage: like the reward model it keeps no checkpoint and restarts.

Under torchrun (DDP, or FSDP2 with --fsdp) every rank computes the reference log-probs of all the data
(one frozen pass; cheaper than gathering them) and, at each step, the policy's log-probs of its share of
the global batch's prompts; its loss is its prompts' part of the batch mean (`grouped_loss`'s n_global),
so the gradient, and every step's loss, are those of one process with the same --batch-size.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignloop import dist
from alignloop import evaljson
from alignloop import forward
from alignloop import precision
from alignloop.config import Preferences, option
from alignloop.errors import InputError
from alignloop.rundir import save_stage_config
from alignloop.train import loop
from alignloop.train import reward
from alignloop.train.pairs import (by_agreement, default_data, labeler_agreement, parse_sources, read_comparisons,
                                   split_groups, usable)

SECTION = "dpo"


@dataclass
class Config(Preferences):
    reference: str = option("", "the reference π_ref of the implicit reward (default: the run's sft/)")
    beta: float = option(0.1, "β > 0 of the implicit reward β·log(π/π_ref): smaller lets the policy move further "
                         "from the reference (DPO paper: 0.1–0.5)")  # > 0: check()
    lora_rank: int = option(0, "LoRA adapters of this rank on every linear layer (0: full weights); the reference is then "
                            "the policy with its adapters off when both start from one folder; saved merged", min=0)
    epochs: int = option(1, "passes over the comparisons (DPO over-fits preferences quickly)", min=1)
    lr: float = option(5e-5, "peak learning rate", min=0.0, max=1.0)
    micro_batch_size: int = option(0, "prompts per forward/backward pass, their gradients summed into one step of "
                                   "--batch-size prompts (less memory, the same step; 0: the whole batch at once)",
                                   min=0)


# untuned beyond a check that one epoch moves the micro/tiny policies (see METHODS-NOTES.md)
PRESETS = {"micro": dict(batch_size=8, warmup_steps=2, lr=1e-4), "tiny": dict(lr=1e-4),
           "small": dict(batch_size=32, lr=5e-7, max_len=1024)}


def check(cfg: Config) -> None:
    """Bad settings, refused before the stage guard (which may move an old folder aside) and any work."""
    if not cfg.beta > 0:
        raise InputError(f"β = {cfg.beta:g}: the implicit reward β·log(π/π_ref) needs β > 0", field="beta")


# ---------------------------------------------------------------- the maths


def dpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, groups: list[list[tuple[int, int]]], offsets: list[int],
             beta: float, n_global: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, implicit rewards h): h = β·(log π − log π_ref) of every completion of the batch (prompt g's
    start at offsets[g]), and the reward model's grouped loss on h: mean over prompts of
    −mean over its (better, worse) pairs of log σ(h_better − h_worse) (with n_global: these prompts' share
    of the mean over a global batch of n_global prompts, one rank's part)."""
    h = beta * (logp - ref_logp)
    return reward.grouped_loss(h, groups, offsets, n_global), h


def pair_accuracy(h: torch.Tensor, groups: list[list[tuple[int, int]]], offsets: list[int]) -> tuple[float, int]:
    """(share of pairs whose preferred answer has the larger implicit reward, ties ½; number of pairs)."""
    right = n = 0.0
    for pairs, off in zip(groups, offsets):
        for a, b in pairs:
            d = float(h[off + a] - h[off + b])
            right += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
            n += 1
    return (right / n if n else float("nan")), int(n)


def answer_ids(tok, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer's ids are what `render` adds after the generation prompt, up to
    and including its end-of-turn token (the tokens SFT learns; not what a template writes after it)."""
    ids, mask = tok.render(prompt + [{"role": "assistant", "content": answer}])
    p = tok.render_prompt(prompt)
    last = max(i for i, m in enumerate(mask) if m)
    if ids[:len(p)] != p or last < len(p):
        raise InputError("the chat template does not render the prompt as a prefix of the conversation",
                         field="chat_template")
    return p, ids[len(p):last + 1]


def sequence_logprobs(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device, allowed,
                      max_rows: int = 64, progress=None) -> torch.Tensor:
    """log π(answer | prompt) of each row (B,): the answer tokens' log-probs summed, from one padded batch
    (`forward.layout`: every answer starts at one column) per `max_rows` rows. Over `max_rows` rows they go
    in length order (real pairs differ in length by 10×: the padding of a random 64 is mostly waste), and
    `progress(n)` hears of each pass's n rows."""
    order = (sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) + len(answers[i]), i))
             if len(prompts) > max_rows else list(range(len(prompts))))
    out = [torch.zeros(0, device=device)]
    for s in range(0, len(order), max_rows):
        idx = order[s:s + max_rows]
        ids, attn, pos, mask, P = forward.layout([prompts[i] for i in idx], [answers[i] for i in idx], pad_id, device)
        lp = forward.action_logprobs(model, ids, attn, pos, P, allowed)
        out.append((lp * mask).sum(1))
        if progress:
            progress(len(idx))
    got = torch.cat(out)
    return got[torch.argsort(torch.tensor(order, device=got.device))]


# ---------------------------------------------------------------- the stage


def run(cfg: Config, out: Path) -> Path:
    from alignloop.model import load_causal_lm, n_params, save_model

    check(cfg)
    init, reference, tok, train, val = _comparisons(cfg, out)  # bad input stops here, before any work
    train, stop = reward.early_stop_split(train, cfg, "dpo")  # --early-stop: a slice of the training prompts
    if cfg.fsdp and cfg.lora_rank and dist.launched():
        raise InputError("--fsdp with --lora-rank is not supported yet (LoRA under torchrun: DDP, without --fsdp)",
                         field="fsdp")
    device = dist.setup(cfg)
    dist.check_rows(min(cfg.batch_size, len(train)), "a batch of prompts (--batch-size, or the data)", "batch_size")
    policy = load_causal_lm(init).to(device).train()
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if cfg.lora_rank:
        policy = loop.apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    allowed = forward.allowed_tokens(tok, policy.config.vocab_size, device)
    t0 = time.perf_counter()
    ref_lp = _reference_logprobs(cfg, policy, init, reference, tok, device, allowed, (train, val, stop))
    starts = {id(gs): _offsets(gs) for gs in (train, val)}
    best = reward.Best(policy, "dpo") if stop else None
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    # under torchrun `net` is DDP or FSDP2 around the log-probs' forward pass; in one process the policy itself
    net = dist.wrap(forward.Through(policy), cfg.fsdp, device, cfg.dtype) if dist.world() > 1 else policy
    rows_per_pass = 64 if dist.world() == 1 else 1 << 30  # DDP and FSDP count passes: one per step on every rank
    opt = loop.make_optimizer(net, cfg.lr, cfg.weight_decay)
    max_steps = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    stage = out / f"round-{cfg.round}" / "dpo"
    metrics = loop.Metrics(stage) if dist.is_main() else None  # only rank 0 writes
    n_cmp = sum(len(g.pairs) for g in train)
    print(f"dpo: β {cfg.beta:g}, {len(train)} prompts / {n_cmp} comparisons to learn, {len(val)} held out, "
          f"{f'{len(stop)} for early stopping, ' if stop else ''}"
          f"policy {init}, reference {reference}, {n_params(policy, False) / 1e6:.2f}M parameters "
          f"({n_train / 1e6:.2f}M learn){f', LoRA rank {cfg.lora_rank}' if cfg.lora_rank else ''}"
          + (f", {dist.world()} processes ({'FSDP2' if cfg.fsdp else 'DDP'})" if dist.world() > 1 else ""))
    rng = random.Random(cfg.seed)
    bar = loop.Progress(max_steps, "dpo")
    step = n_seen = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            batch = order[s:s + cfg.batch_size]
            # this rank's prompts of the global batch, in passes of --micro-batch-size prompts; every rank runs
            # the same number of passes (DDP reduces at the last), so a rank short of prompts runs a pass on one
            # prompt and counts nothing (weight 0)
            mine = dist.part(batch)
            per_pass = cfg.micro_batch_size or len(batch)
            n_pass = math.ceil(math.ceil(len(batch) / dist.world()) / per_pass)
            loop.set_lr(opt, loop.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, 0.1))
            loss_sum, right_n, hs = torch.zeros((), device=device), [0.0, 0.0], []
            for k in range(n_pass):
                chunk = mine[k * per_pass:(k + 1) * per_pass]
                weight = 1.0 if chunk else 0.0
                gs = [train[i] for i in chunk or batch[:1]]
                rows = [starts[id(train)][i] + j for i in chunk or batch[:1] for j in range(len(train[i].completions))]
                offsets = _offsets(gs)
                with dist.grad_sync(net, k == n_pass - 1):
                    with precision.autocast(device, cfg.dtype):  # as the reference's log-probs were
                        logp = sequence_logprobs(net, *_flat(gs), tok.pad_id, device, allowed, rows_per_pass)
                    # these prompts' share of the global batch's mean: the passes' losses sum to the step's
                    loss, h = dpo_loss(logp, ref_lp[id(train)][rows], [g.pairs for g in gs], offsets, cfg.beta,
                                       len(batch))
                    (loss * weight * dist.world()).backward()  # × world: DDP and FSDP average the ranks' gradients
                loss_sum += (loss * weight).detach()
                acc, n = pair_accuracy(h.detach(), [g.pairs for g in gs], offsets)
                right_n = [right_n[0] + (acc * n * weight if n else 0.0), right_n[1] + n * weight]
                if weight:
                    hs.append(h.detach())
            torch.nn.utils.clip_grad_norm_([q for q in net.parameters() if q.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_seen += sum(len(train[i].pairs) for i in batch)
            right, n = dist.all_sum(torch.tensor(right_n, dtype=torch.float64, device=device)).tolist()
            rec = {"step": step, "epoch": epoch + 1, "loss": dist.all_sum(loss_sum).item(),
                   "pair_accuracy": right / n if n else float("nan"),
                   "implicit_reward": torch.cat(hs).mean().item() if hs else float("nan"),
                   "lr": opt.param_groups[0]["lr"],
                   "comparisons_per_s": n_seen / (time.perf_counter() - t0)}
            if metrics:
                metrics.log(**rec)
            bar.update(1, loss=rec["loss"], acc=rec["pair_accuracy"])
        if best:  # the implicit reward's loss on the early-stopping prompts; the epoch of the lowest is kept
            best.consider(epoch + 1, _held_out(cfg, policy, stop, ref_lp[id(stop)], tok, device, allowed)["val_loss"], bar)
            policy.train()
    bar.close()
    if best:
        best.restore()
    train_time = time.perf_counter() - t0
    policy = dist.gathered(net, policy)  # rank 0: the whole plain policy; the other ranks are done
    if not dist.is_main():
        return stage
    policy.to(device)
    result = {"beta": cfg.beta, "steps": step, "train_seconds": train_time, "n_train_prompts": len(train),
              "n_train_comparisons": n_cmp, "early_stop": best.record() if best else None}
    if val:  # held out by prompt: does the implicit reward order answers it never saw?
        result |= _held_out(cfg, policy, val, ref_lp[id(val)], tok, device, allowed)
    result["peak_memory_gb"] = loop.peak_memory_gb(device)
    save_model(loop.merged(policy), tok, stage)
    evaljson.write_stage(stage, result)
    save_stage_config(out, SECTION, cfg)
    print(f"dpo: round {cfg.round} done in {train_time:.0f} s"
          + (f", held-out implicit-reward pair accuracy {result['pair_accuracy']:.3f} on {result['n_prompts']} prompts"
             if val else "") + f", peak memory {result['peak_memory_gb']:.2f} GB → {stage}")
    return stage


def _comparisons(cfg: Config, out: Path):
    """(policy folder, reference folder, tokenizer, training groups, held-out groups): the comparisons of
    `--sources` (or `--data`) whose labelers agree enough, each completion as (prompt ids, answer ids), those
    that fit `max_len` split by prompt as the reward model splits them; both models checked to exist and to
    share one tokenizer."""
    from alignloop.sources import resolve_model
    from alignloop.tokenizer import ChatTokenizer
    sources = parse_sources(cfg.sources)
    paths = ([Path(p.strip()) for p in cfg.data.split(",") if p.strip()] if cfg.data
             else default_data(out, cfg.round, sources))
    print(f"dpo: reading {', '.join(map(str, paths))} (sources: {', '.join(sources)})")
    groups = [g for p in paths for g in read_comparisons(p, cfg.skip_invalid)]
    groups = by_agreement([g for g in groups if not g.origin or g.origin in sources], cfg.min_agreement)
    init = resolve_model(cfg.init, out, "init") if cfg.init else out / "sft"
    reference = resolve_model(cfg.reference, out, "reference") if cfg.reference else out / "sft"
    for name, path in (("policy", init), ("reference", reference)):
        if not (path / "config.json").exists():
            raise InputError(f"the {name} folder has no model (give --{'init' if name == 'policy' else name}: "
                             "by default the run's sft/)", file=path, field="init" if name == "policy" else name)
    tok = ChatTokenizer.load(init)
    if ChatTokenizer.load(reference).hf.get_vocab() != tok.hf.get_vocab():
        raise InputError(f"the reference's tokenizer differs from the policy's ({init})", file=reference, field="tokenizer")
    for g in groups:
        g.ids = [answer_ids(tok, g.prompt, c) for c in g.completions]  # (prompt ids, answer ids) per completion
    kept = usable(groups, lambda g: max(len(p) + len(a) for p, a in g.ids), cfg.max_len, "dpo", paths[0])
    train, val = split_groups(kept, cfg)
    return init, reference, tok, train, val


def _flat(groups) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of every completion of `groups`, in order."""
    rows = [x for g in groups for x in g.ids]
    return [p for p, _ in rows], [a for _, a in rows]


@torch.no_grad()
def _reference_logprobs(cfg: Config, policy, init: Path, reference: Path, tok, device, allowed, splits) -> dict:
    """log π_ref of every completion of each list of groups in `splits`, by id(list): once, before training
    (π_ref is frozen and the data are fixed). With LoRA and one folder for both, π_ref is the policy with
    its adapters off; otherwise the reference is loaded frozen (bf16 on a GPU, fp32 on the CPU) and dropped."""
    bar = loop.Progress(sum(len(g.ids) for gs in splits for g in gs), "dpo: reference log-probs")
    with precision.autocast(device, cfg.dtype):
        if cfg.lora_rank and reference.resolve() == init.resolve():
            with policy.disable_adapter():
                policy.eval()
                ref_lp = {id(gs): sequence_logprobs(policy, *_flat(gs), tok.pad_id, device, allowed,
                                                    progress=bar.update) for gs in splits}
            policy.train()
        else:
            from alignloop.model import load_causal_lm
            frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
            ref = load_causal_lm(reference, dtype=frozen).to(device).eval()
            ref_lp = {id(gs): sequence_logprobs(ref, *_flat(gs), tok.pad_id, device, allowed, progress=bar.update)
                      for gs in splits}
            del ref
    bar.close()
    return ref_lp


@torch.no_grad()
def _held_out(cfg: Config, policy, val, ref_lp: torch.Tensor, tok, device, allowed) -> dict:
    """The trained policy's implicit reward on the held-out prompts: loss, pair accuracy, the labelers' agreement."""
    policy.eval()
    starts = _offsets(val)
    with precision.autocast(device, cfg.dtype):
        lp = sequence_logprobs(policy, *_flat(val), tok.pad_id, device, allowed)
    loss, h = dpo_loss(lp, ref_lp, [g.pairs for g in val], starts, cfg.beta)
    acc, n = pair_accuracy(h, [g.pairs for g in val], starts)
    return {"val_loss": loss.item(), "pair_accuracy": acc, "n_pairs": n,
            "n_prompts": len({json.dumps(g.prompt) for g in val}), "labeler_agreement": labeler_agreement(val)}


def _offsets(groups) -> list[int]:
    """Where each group's completions start in the flat list of all completions."""
    out, o = [], 0
    for g in groups:
        out.append(o)
        o += len(g.completions)
    return out
