"""Step 2 — the reward model (`alignloop reward`).

An LM trunk (from SFT by default) with a scalar head, trained on K-way rankings with InstructGPT's loss
    loss = −1/C(K,2) · Σ_(y_w ≻ y_l) log σ(r(x, y_w) − r(x, y_l))
where all C(K,2) pairs of one prompt form ONE batch element: each completion is scored once (K forward
passes, not K·(K−1)) and the pairs of a prompt are never spread over the epoch, which InstructGPT found
to over-fit. Pairs (`chosen`/`rejected`, Anthropic HH-RLHF strings included) are groups of K = 2.
After training a bias is set so that the demonstrations score 0 on average (InstructGPT normalises
the RM before RL); it is kept in the model's config as `reward_bias`.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from alignloop.config import option
from alignloop.errors import InputError
from alignloop.io import read_records, write_json
from alignloop.rundir import resolve_path, save_stage_config
from alignloop.tokenizer import validate_messages
from alignloop.train import loop as L

SECTION = "reward"


@dataclass
class Config:
    round: int = option(1, "round number: output goes to RUN/round-<round>/reward/", min=1)
    data: str = option("", "rankings or pairs files, comma-separated (default: rankings.jsonl and pairs.jsonl of rounds 1..round)")
    init: str = option("", "trunk to start from (default: the run's sft/)")
    demonstrations: str = option("", "demonstrations whose mean score is set to 0 (default: the run's world/demonstrations.jsonl; 'none' to skip)")
    skip_invalid: bool = option(False, "leave out malformed rankings or pairs (counted, the first named) instead of stopping")
    grouped: bool = option(True, "all pairs of a prompt in one batch element (False: independent shuffled pairs)")
    train_trunk: bool = option(True, "train the trunk too (False: only the scalar head learns)")
    epochs: int = option(2, "passes over the comparisons (InstructGPT: 1; it over-fits after)", min=1)
    batch_size: int = option(16, "prompts (grouped) or pairs (shuffled) per step", min=1)
    max_seconds: float = option(0.0, "stop training after this many seconds (0: off; for equal-compute comparisons)", min=0.0)
    lr: float = option(2e-4, "peak learning rate", min=0.0, max=1.0)
    warmup_steps: int = option(10, "linear warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", min=0.0)
    max_len: int = option(256, "longest prompt + answer in tokens; longer ones are left out (counted)", min=8)
    val_fraction: float = option(0.1, "prompts held out when the data marks no held-out split", min=0.0, max=0.5)
    seed: int = option(0, "seed for data order and the held-out split")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16", choices=("auto", "float32", "bfloat16"))


# tiny: lr 1e-3 put the 1.3M trunk at 91% of the labelers' agreement where 2e-4 gave 88% (docs/LOG.md)
PRESETS = {"micro": dict(batch_size=8, epochs=2, warmup_steps=2, lr=1e-3), "tiny": dict(lr=1e-3), "small": dict(batch_size=32, lr=1e-5, max_len=1024)}


# ---------------------------------------------------------------- data


@dataclass
class Group:
    """One prompt, its K completions, and the comparisons among them as (better, worse) index pairs."""
    prompt: list[dict]
    completions: list[str]
    pairs: list[tuple[int, int]]
    labeler: str = ""
    split: str = ""
    source: str = ""
    ids: list[list[int]] = field(default_factory=list)
    prompt_id: str = ""


_HH = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH-RLHF's "\\n\\nHuman: … \\n\\nAssistant: …" → messages."""
    parts = _HH.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF dialogue")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _kind_of(rec: dict) -> str:
    if "ranking" in rec and "completions" in rec:
        return "rankings"
    if "chosen" in rec and "rejected" in rec:
        return "pairs"
    if "completions" in rec:
        return "samples (completions without a ranking: rank them first)"
    if "messages" in rec:
        return "demonstrations or prompts (messages)"
    if "prompt" in rec and "completion" in rec:
        return "demonstrations (prompt/completion)"
    if "prompt" in rec:
        return "prompts"
    if "text" in rec:
        return "plain text"
    return "unknown"


def read_comparisons(path: Path, skip_invalid: bool = False) -> list[Group]:
    """Every ranking or pair of a file. A malformed one stops with file, line and field, unless
    `skip_invalid`: then it is left out and counted (real HH-RLHF files hold a few: 6 of the first 1,800
    of harmless-base have an empty last assistant turn or a turn marker without its newlines)."""
    records = read_records(path)
    kinds = {_kind_of(r) for _, r in records[:50]}
    if not kinds & {"rankings", "pairs"}:
        raise InputError(f"this looks like a {sorted(kinds)[0]} file; the reward model needs rankings "
                         f"({{prompt, completions, ranking}}) or pairs ({{chosen, rejected}})", file=path)
    groups, bad = [], []
    for line, rec in records:
        try:
            groups.append(_group(rec, path, line))
        except InputError as e:
            if not skip_invalid:
                raise
            bad.append(e)
    if bad:
        print(f"reward: {len(bad)} of {len(records)} comparisons in {path} left out as invalid (first: {bad[0]})")
    return groups


def _prompt(rec, path, line) -> list[dict]:
    p = rec.get("prompt")
    if p is None:
        return []
    msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
    return validate_messages(msgs, path, line)


def _group(rec: dict, path: Path, line: int) -> Group:
    kind = _kind_of(rec)
    if kind == "rankings":
        comps, ranking = rec["completions"], rec["ranking"]
        if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
            raise InputError("expected a list of strings", file=path, line=line, field="completions")
        K = len(comps)
        if K < 2:
            raise InputError(f"K = {K}: a ranking needs 2 to 9 completions", file=path, line=line, field="completions")
        if K > 9:
            print(f"reward: warning: {path}:{line}: K = {K} is above the 4–9 of InstructGPT")
        for i, c in enumerate(comps):
            if not c.strip():
                raise InputError("empty completion", file=path, line=line, field=f"completions[{i}]")
        if len(set(comps)) < K:
            raise InputError("duplicated completions", file=path, line=line, field="completions")
        if not isinstance(ranking, list) or sorted(ranking) != list(range(K)):
            raise InputError(f"not a permutation of the completions' indices 0..{K - 1}", file=path, line=line,
                             field="ranking")
        tied = {}
        for g, group in enumerate(rec.get("ties") or []):
            for i in group:
                tied[i] = g
        pairs = [] if rec.get("all_bad") else [
            (ranking[a], ranking[b]) for a in range(K) for b in range(a + 1, K)
            if not (ranking[a] in tied and tied.get(ranking[b]) == tied[ranking[a]])]
        return Group(_prompt(rec, path, line), comps, pairs, str(rec.get("labeler", "")), str(rec.get("split", "")),
                     f"{path}:{line}", prompt_id=str(rec.get("prompt_id", "")))
    if kind != "pairs":
        missing = "ranking" if "completions" in rec else "rejected" if "chosen" in rec else "chosen"
        raise InputError(f"neither a ranking {{prompt, completions, ranking}} nor a pair {{chosen, rejected}} "
                         f"(this line looks like {kind})", file=path, line=line, field=missing)
    chosen, rejected = rec["chosen"], rec["rejected"]
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, str) or not v.strip():
            raise InputError("expected a non-empty string", file=path, line=line, field=name)
    if chosen == rejected:
        raise InputError("chosen equals rejected", file=path, line=line, field="rejected")
    prompt = _prompt(rec, path, line)
    if not prompt and chosen.startswith("\n\nHuman:"):
        try:
            a, b = parse_hh(chosen), parse_hh(rejected)
        except ValueError:
            raise InputError("not an HH-RLHF dialogue", file=path, line=line, field="rejected") from None
        if a[:-1] != b[:-1] or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise InputError("the two HH-RLHF dialogues do not share a prefix ending before the last assistant turn",
                             file=path, line=line, field="rejected")
        prompt, chosen, rejected = validate_messages(a[:-1], path, line), a[-1]["content"], b[-1]["content"]
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if not v:
                raise InputError("empty final assistant turn", file=path, line=line, field=name)
        if chosen == rejected:
            raise InputError("chosen equals rejected", file=path, line=line, field="rejected")
    return Group(prompt, [chosen, rejected], [(0, 1)], str(rec.get("labeler", "")), str(rec.get("split", "")),
                 f"{path}:{line}")


def default_data(out: Path, round_: int) -> list[Path]:
    """Every round's rankings (and correction pairs) so far: the RM of round i learns from all of them."""
    paths = []
    for i in range(1, round_ + 1):
        for name in ("rankings.jsonl", "pairs.jsonl", "chat-pairs.jsonl"):
            p = out / f"round-{i}" / name
            if p.exists() and p.stat().st_size > 0:
                paths.append(p)
    if not paths:
        raise InputError(f"no rankings found in rounds 1..{round_}: run `alignloop rank` or give --data", file=out)
    return paths


# ---------------------------------------------------------------- model


def scalar_values(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token scalar outputs of a sequence-classification model (the head at every position)."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=ids, attention_mask=attn).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def batch_rewards(model, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Reward of each whole sequence = the head's output at its last token (right padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s), 1
    values = scalar_values(model, ids.to(device), attn.to(device))
    last = attn.sum(1).to(device) - 1
    return values.gather(1, last[:, None]).squeeze(1)


def grouped_loss(rewards: torch.Tensor, groups: list[list[tuple[int, int]]], offsets: list[int]) -> torch.Tensor:
    """Mean over prompts of −mean over its pairs of log σ(r_w − r_l). `rewards` holds every completion of
    every prompt in the batch; prompt g's completions start at offsets[g]."""
    losses = []
    for pairs, off in zip(groups, offsets):
        if not pairs:
            continue
        w = torch.tensor([off + a for a, _ in pairs], device=rewards.device)
        l_ = torch.tensor([off + b for _, b in pairs], device=rewards.device)
        losses.append(-F.logsigmoid(rewards[w] - rewards[l_]).mean())
    return torch.stack(losses).mean()


class RewardScorer:
    """A trained reward model as a function: (prompts, answers) → normalised scores."""

    def __init__(self, path: Path, device, batch_size: int = 64):
        from alignloop.model import load_scalar_model
        from alignloop.tokenizer import ChatTokenizer
        self.model = load_scalar_model(path).to(device).eval()
        self.tok = ChatTokenizer.load(path)
        self.bias = float(getattr(self.model.config, "reward_bias", 0.0))
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score_texts(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        seqs = [self.tok.render(p + [{"role": "assistant", "content": a or " "}])[0] for p, a in zip(prompts, answers)]
        return self.score_ids(seqs)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        out = []
        for s in range(0, len(seqs), self.batch_size):
            out += (batch_rewards(self.model, seqs[s:s + self.batch_size], self.tok.pad_id, self.device) + self.bias).tolist()
        return out


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
    scores = []
    for i in range(0, len(flat), batch_size):
        scores += batch_rewards(model, flat[i:i + batch_size], pad_id, device).tolist()
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


def labeler_agreement(groups: list[Group]) -> float | None:
    """Share of pairs on which two labelers who ranked the same completions agree (the RM's ceiling)."""
    by_item: dict[tuple, list[Group]] = {}
    for g in groups:
        if g.labeler:
            by_item.setdefault((json.dumps(g.prompt), tuple(g.completions)), []).append(g)
    agree = total = 0
    for gs in by_item.values():
        for i in range(len(gs)):
            for j in range(i + 1, len(gs)):
                pref_j = {frozenset(p): p for p in gs[j].pairs}
                for p in gs[i].pairs:
                    q = pref_j.get(frozenset(p))
                    if q is not None:
                        total += 1
                        agree += q == p
    return agree / total if total else None


# ---------------------------------------------------------------- the stage


def run(cfg: Config, out: Path) -> Path:
    from alignloop.model import load_scalar_model, n_params, pick_device, save_model
    from alignloop.tokenizer import ChatTokenizer

    paths = [Path(p.strip()) for p in cfg.data.split(",") if p.strip()] if cfg.data else default_data(out, cfg.round)
    groups = [g for p in paths for g in read_comparisons(p, cfg.skip_invalid)]  # bad input stops here, before any work
    init = resolve_path(cfg.init, out, "sft")
    tok = ChatTokenizer.load(init)
    for g in groups:
        g.ids = [tok.render(g.prompt + [{"role": "assistant", "content": c}])[0] for c in g.completions]
    kept = [g for g in groups if g.pairs and max(len(s) for s in g.ids) <= cfg.max_len]
    if len(kept) < len(groups):
        print(f"reward: {len(groups) - len(kept)} of {len(groups)} comparisons left out "
              f"(longer than {cfg.max_len} tokens, or all answers tied / all bad)")
    if not kept:
        raise InputError("no usable comparisons", file=paths[0])
    train, val = split_groups(kept, cfg)
    device = pick_device(cfg.device)
    model = load_scalar_model(init).to(device).train()
    if not cfg.train_trunk:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("score.")
    opt = L.make_optimizer(model, cfg.lr, cfg.weight_decay)
    units = train if cfg.grouped else [Group(g.prompt, g.completions, [p], g.labeler, g.split, g.source, g.ids)
                                       for g in train for p in g.pairs]
    steps_per_epoch = math.ceil(len(units) / cfg.batch_size)
    max_steps = steps_per_epoch * cfg.epochs
    stage = out / f"round-{cfg.round}" / "reward"
    metrics = L.Metrics(stage)
    n_cmp = sum(len(g.pairs) for g in train)
    print(f"reward: {len(train)} prompts / {n_cmp} comparisons to learn ({'grouped K-way' if cfg.grouped else 'shuffled pairs'}), "
          f"{len(val)} held out, {n_params(model, False) / 1e6:.2f}M parameters")
    rng = random.Random(cfg.seed)
    bar = L.Progress(max_steps, "reward")
    t0, step, n_seen = time.perf_counter(), 0, 0
    for epoch in range(cfg.epochs):
        if cfg.max_seconds and time.perf_counter() - t0 >= cfg.max_seconds:
            break
        order = list(range(len(units)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            if cfg.max_seconds and time.perf_counter() - t0 >= cfg.max_seconds:
                break
            batch = [units[i] for i in order[s:s + cfg.batch_size]]
            L.set_lr(opt, L.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, 0.1))
            offsets, seqs = [], []
            for g in batch:
                offsets.append(len(seqs))
                # shuffled pairs score only the two completions of their pair
                seqs += g.ids if cfg.grouped else [g.ids[g.pairs[0][0]], g.ids[g.pairs[0][1]]]
            pairs = [g.pairs for g in batch] if cfg.grouped else [[(0, 1)]] * len(batch)
            with L.autocast(device, cfg.dtype):
                rewards = batch_rewards(model, seqs, tok.pad_id, device)
            loss = grouped_loss(rewards, pairs, offsets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_seen += sum(len(p) for p in pairs)
            rec = {"step": step, "epoch": epoch + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                   "comparisons_per_s": n_seen / (time.perf_counter() - t0)}
            metrics.log(**rec)
            bar.update(1, loss=rec["loss"])
    bar.close()
    train_time = time.perf_counter() - t0
    result = (evaluate(model, val, tok.pad_id, device, gold=gold_scores(val, out)) if val
              else {"pair_accuracy": None, "labeler_agreement": None})
    result |= {"train_seconds": train_time, "n_train_comparisons": n_cmp, "n_train_prompts": len(train),
               "grouped": cfg.grouped, "steps": step, "comparisons_seen": n_seen,
               "comparisons_per_s": n_seen / train_time}
    model.config.reward_bias = -mean_demo_score(model, tok, cfg, out, device)
    result["reward_bias"] = model.config.reward_bias
    save_model(model, tok, stage)
    write_json(stage / "eval.json", result)
    save_stage_config(out, SECTION, cfg)
    acc, agr = result.get("pair_accuracy"), result.get("labeler_agreement")
    print(f"reward: held-out pair accuracy {acc:.3f} on {result['n_prompts']} prompts never trained on"
          + (f", labelers' agreement on the same pairs {agr:.3f} (accuracy is {acc / agr:.0%} of that ceiling)" if agr else "")
          + (f"; against the noise-free gold order {result['gold_accuracy']:.3f} (labelers {result['labeler_gold_accuracy']:.3f})"
             if result.get("gold_accuracy") is not None else "") if acc is not None else "reward: no held-out data")
    return stage


def split_groups(groups: list[Group], cfg: Config) -> tuple[list[Group], list[Group]]:
    """Held out by prompt, the same prompts in every round: a prompt that any record marks held out (rank.py
    decides once per run) is held out in all its records, from every round; data without marks hold out
    the prompts a hash of (seed, prompt) picks, about `val_fraction`, which new rounds' data do not move."""
    from alignloop.rank import heldout_prompt
    held = {json.dumps(g.prompt) for g in groups if g.split == "heldout"}
    if not held:
        held = {k for k in {json.dumps(g.prompt) for g in groups} if heldout_prompt(k, cfg.seed, cfg.val_fraction)}
    return [g for g in groups if json.dumps(g.prompt) not in held], [g for g in groups if json.dumps(g.prompt) in held]


@torch.no_grad()
def mean_demo_score(model, tok, cfg: Config, out: Path, device) -> float:
    if cfg.demonstrations == "none":
        return 0.0
    path = resolve_path(cfg.demonstrations, out, "world/demonstrations.jsonl")
    if not path.exists():
        print("reward: no demonstrations to normalise against; bias 0")
        return 0.0
    seqs = []
    for line, rec in read_records(path):
        msgs = rec.get("messages") or ([{"role": "user", "content": rec["prompt"]},
                                        {"role": "assistant", "content": rec["completion"]}] if "completion" in rec else None)
        if msgs and msgs[-1]["role"] == "assistant":
            ids = tok.render(validate_messages(msgs, path, line))[0]
            if len(ids) <= cfg.max_len:
                seqs.append(ids)
    model.eval()
    scores = [r for i in range(0, len(seqs), 64) for r in batch_rewards(model, seqs[i:i + 64], tok.pad_id, device).tolist()]
    return sum(scores) / len(scores) if scores else 0.0
