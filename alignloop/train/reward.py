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

from alignloop import dist as D
from alignloop.config import Preferences, option
from alignloop.forward import scalar_values, sequence_scores, unwrap  # noqa: F401 (scalar_values: re-exported)
from alignloop.errors import InputError
from alignloop.io import read_records, write_json
from alignloop.rundir import by_version, resolve_path, save_stage_config
from alignloop.tokenizer import validate_messages
from alignloop.train import loop as L

SECTION = "reward"


@dataclass
class Config(Preferences):
    demonstrations: str = option("", "demonstrations whose mean score is set to 0 (default: the run's world/demonstrations.jsonl; 'none' to skip)")
    grouped: bool = option(True, "all pairs of a prompt in one batch element (False: independent shuffled pairs)")
    train_trunk: bool = option(True, "train the trunk too (False: only the scalar head learns)")
    train_layers: int = option(-1, "train only the last N decoder blocks, the final norm and the head (-1: all)", min=-1)
    max_seconds: float = option(0.0, "stop training after this many seconds (0: off; for equal-compute comparisons)", min=0.0)


# tiny: lr 3e-4 over 4 epochs ordered the held-out answers as gold does 0.672 of the time, where lr 1e-3
# over 2 (the earlier preset) gave 0.621, and PPO from it gained +0.033 dev gold instead of +0.016 (docs/LOG.md)
PRESETS = {"micro": dict(batch_size=8, epochs=2, warmup_steps=2, lr=1e-3), "tiny": dict(lr=3e-4, epochs=4),
           "small": dict(batch_size=32, lr=1e-5, max_len=1024)}


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
    origin: str = ""  # the record's own `source` (simulated, label, chat, arena), "" when it names none
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
        tied = _ties(rec.get("ties"), K, path, line)
        pairs = [] if rec.get("all_bad") else [
            (ranking[a], ranking[b]) for a in range(K) for b in range(a + 1, K)
            if not (ranking[a] in tied and tied.get(ranking[b]) == tied[ranking[a]])]
        return Group(_prompt(rec, path, line), comps, pairs, str(rec.get("labeler", "")), str(rec.get("split", "")),
                     f"{path}:{line}", origin=str(rec.get("source") or ""), prompt_id=str(rec.get("prompt_id", "")))
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
                 f"{path}:{line}", origin=str(rec.get("source") or ""))


def _ties(ties, K: int, path, line) -> dict[int, int]:
    """`ties`: groups of completion indices ranked equal → {index: group number}."""
    if ties is None:
        return {}
    if not isinstance(ties, list) or not all(isinstance(g, list) for g in ties):
        raise InputError("expected a list of lists of completion indices", file=path, line=line, field="ties")
    tied: dict[int, int] = {}
    for g, group in enumerate(ties):
        for i in group:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < K or i in tied:
                raise InputError(f"{i!r} is not a completion index 0..{K - 1} (or appears twice)", file=path,
                                 line=line, field="ties")
            tied[i] = g
    return tied


SOURCES = ("simulated", "label", "chat", "arena")
# Files of each source in a round folder. People's exports are versioned (name-<time>.jsonl) and each
# holds everything collected so far, so only the newest of each kind is read.
SOURCE_FILES = {"simulated": ("rankings.jsonl", "pairs.jsonl"), "label": ("human-rankings-*", "human-pairs-*"),
                "chat": ("chat-pairs*", "chat-rankings*"), "arena": ("chat-pairs*", "chat-rankings*")}
# (`rundir.by_version` finds the newest; an unversioned chat-pairs.jsonl of an older run is the oldest)


def parse_sources(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n not in SOURCES:
            raise InputError(f"unknown source {n!r} (expected some of {', '.join(SOURCES)})", field="sources")
    return names


def default_data(out: Path, round_: int, sources: list[str] | tuple = ("simulated", "label")) -> list[Path]:
    """The rankings and pairs of `sources` in rounds 1..round: the RM of round i learns from all of them.
    Chat thumbs and arena votes are read only when `sources` names them."""
    paths: list[Path] = []
    for i in range(1, round_ + 1):
        folder = out / f"round-{i}"
        for pattern in dict.fromkeys(p for s in sources for p in SOURCE_FILES[s]):
            found = by_version(f for f in folder.glob(pattern) if f.suffix == ".jsonl" and ".old-" not in f.name)
            for p in found[-1:] if "*" in pattern else found:
                if p.stat().st_size > 0 and p not in paths:
                    paths.append(p)
    if not paths:
        raise InputError(f"no rankings of sources {', '.join(sources)} found in rounds 1..{round_}: run "
                         f"`alignloop rank`, export from the labeling app, or give --data / --sources", file=out)
    return paths


def by_agreement(groups: list[Group], min_agreement: float) -> list[Group]:
    """Leave out items (same prompt and answers) whose labelers agree on less than `min_agreement` of the
    pairs they both ordered; an item with one labeler has no disagreement to measure and is kept."""
    if min_agreement <= 0:
        return groups
    by_item: dict[tuple, list[Group]] = {}
    for g in groups:
        by_item.setdefault((json.dumps(g.prompt), tuple(g.completions)), []).append(g)
    kept = []
    for gs in by_item.values():
        share = labeler_agreement(gs) if len({g.labeler for g in gs}) > 1 else None
        if share is None or share >= min_agreement:
            kept += gs
    return kept


# ---------------------------------------------------------------- model


def batch_rewards(model, seqs: list[list[int]], pad_id: int, device, max_tokens: int = 4096) -> torch.Tensor:
    """Reward of each whole sequence = the head's output at its last token (`forward.sequence_scores`)."""
    return sequence_scores(model, seqs, pad_id, device, max_tokens)


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


class RewardScorer:
    """A trained reward model as a function: (prompts, answers) → normalised scores. Frozen, so it is
    kept in bf16 on a GPU (fp32 on the CPU, where bf16 matmuls are slow) unless `dtype` says otherwise.
    `model` + `context`: score with a model already in memory (PPO's value model with its LoRA adapters
    disabled IS the reward model: one copy of the weights)."""

    def __init__(self, path: Path, device, batch_size: int = 64, dtype=None, model=None, context=None):
        import contextlib
        from alignloop.model import load_scalar_model
        from alignloop.tokenizer import ChatTokenizer
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = model if model is not None else load_scalar_model(path, dtype=dtype, trained=True).to(device).eval().requires_grad_(False)
        self.context = context or contextlib.nullcontext
        self.tok = ChatTokenizer.load(path)
        self.bias = float(getattr(unwrap(self.model).config, "reward_bias", 0.0))
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score_texts(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        seqs = [self.tok.render(p + [{"role": "assistant", "content": a or " "}])[0] for p, a in zip(prompts, answers)]
        return self.score_ids(seqs)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        """Scores of whole sequences, each from `render` or `ChatTokenizer.scored_ids` (same ids)."""
        out = []
        was_training = self.model.training
        self.model.eval()
        with self.context():
            for s in range(0, len(seqs), self.batch_size):
                out += (sequence_scores(self.model, seqs[s:s + self.batch_size], self.tok.pad_id, self.device)
                        + self.bias).tolist()
        self.model.train(was_training)
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
    from alignloop.train.pretrain import resolve_init
    init = resolve_init(cfg.init, out) if cfg.init else out / "sft"
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
    device = D.setup(cfg)
    model = load_scalar_model(init).to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_rank:
        model = L.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, scalar_head=True, seed=cfg.seed)
    else:
        L.train_top_layers(model, cfg.train_layers if cfg.train_trunk else 0)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    units = train if cfg.grouped else [Group(g.prompt, g.completions, [p], g.labeler, g.split, g.source, g.ids)
                                       for g in train for p in g.pairs]
    D.check_rows(min(cfg.batch_size, len(units)), "a batch of comparisons (--batch-size, or the data)", "batch_size")
    from alignloop.forward import Through
    # under torchrun `net` is DDP or FSDP2 around the scores' forward pass; in one process the model itself
    net = D.wrap(Through(model), cfg.fsdp, device, cfg.dtype) if D.world() > 1 else model
    opt = L.make_optimizer(net, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(units) / cfg.batch_size)
    max_steps = steps_per_epoch * cfg.epochs
    stage = out / f"round-{cfg.round}" / "reward"
    metrics = L.Metrics(stage) if D.is_main() else None  # only rank 0 writes
    n_cmp = sum(len(g.pairs) for g in train)
    print(f"reward: {len(train)} prompts / {n_cmp} comparisons to learn ({'grouped K-way' if cfg.grouped else 'shuffled pairs'}), "
          f"{len(val)} held out, {n_params(model, False) / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M learn)")
    rng = random.Random(cfg.seed)
    bar = L.Progress(max_steps, "reward")
    t0, step, n_seen = time.perf_counter(), 0, 0
    for epoch in range(cfg.epochs):
        if cfg.max_seconds and D.same(time.perf_counter() - t0) >= cfg.max_seconds:  # one clock for all ranks
            break
        order = list(range(len(units)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            if cfg.max_seconds and D.same(time.perf_counter() - t0) >= cfg.max_seconds:  # one clock for all ranks
                break
            batch = [units[i] for i in order[s:s + cfg.batch_size]]
            L.set_lr(opt, L.lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, 0.1))
            # this rank's prompts of the global batch (the last batch of an epoch may leave a rank without
            # one: it scores one and counts nothing, as every rank must run the same passes)
            mine = D.part(batch)
            weight = 1.0 if mine else 0.0
            offsets, seqs = [], []
            for g in mine or batch[:1]:
                offsets.append(len(seqs))
                # shuffled pairs score only the two completions of their pair
                seqs += g.ids if cfg.grouped else [g.ids[g.pairs[0][0]], g.ids[g.pairs[0][1]]]
            pairs = [g.pairs for g in mine or batch[:1]] if cfg.grouped else [[(0, 1)]] * len(offsets)
            with L.autocast(device, cfg.dtype):
                # under torchrun one forward pass per step (DDP and FSDP count passes across ranks)
                rewards = batch_rewards(net, seqs, tok.pad_id, device, 4096 if D.world() == 1 else 1 << 60)
            loss = grouped_loss(rewards, pairs, offsets, n_global=len(batch)) * weight
            (loss * D.world()).backward()  # × world: DDP and FSDP average the ranks' gradients
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_seen += sum(len(g.pairs) for g in batch) if cfg.grouped else len(batch)
            rec = {"step": step, "epoch": epoch + 1, "loss": D.all_sum(loss.detach()).item(),
                   "lr": opt.param_groups[0]["lr"], "comparisons_per_s": n_seen / (time.perf_counter() - t0)}
            if metrics:
                metrics.log(**rec)
            bar.update(1, loss=rec["loss"])
    bar.close()
    train_time = time.perf_counter() - t0
    model = D.gathered(net, model)  # rank 0 evaluates and saves the whole plain model; the other ranks are done
    if not D.is_main():
        return stage
    model.to(device)
    result = (evaluate(model, val, tok.pad_id, device, gold=gold_scores(val, out)) if val
              else {"pair_accuracy": None, "labeler_agreement": None})
    result |= {"train_seconds": train_time, "n_train_comparisons": n_cmp, "n_train_prompts": len(train),
               "grouped": cfg.grouped, "steps": step, "comparisons_seen": n_seen,
               "comparisons_per_s": n_seen / train_time}
    model = L.merged(model)
    model.config.reward_bias = -mean_demo_score(model, tok, demos, cfg, device)
    result["reward_bias"] = model.config.reward_bias
    result["peak_memory_gb"] = L.peak_memory_gb(device)
    save_model(model, tok, stage)
    write_json(stage / "eval.json", result)
    save_stage_config(out, SECTION, cfg)
    acc, agr = result.get("pair_accuracy"), result.get("labeler_agreement")
    print(f"reward: peak memory {result['peak_memory_gb']:.2f} GB")
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
    seqs = [ids for ids in (tok.render(m)[0] for m in demos) if len(ids) <= cfg.max_len]
    model.eval()
    scores = [r for i in range(0, len(seqs), 64) for r in batch_rewards(model, seqs[i:i + 64], tok.pad_id, device).tolist()]
    return sum(scores) / len(scores) if scores else 0.0
