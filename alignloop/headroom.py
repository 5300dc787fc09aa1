"""Where the gain is lost: a headroom table per prompt category (RUN/headroom.json, a step of the main job).

Three questions about the feedback loop, asked of every category of dev prompt:
  1. Is there anything to gain by sampling? The SFT policy answers each of the first `N_PROMPTS` dev prompts
     K times (eval's temperature and length). `mean`: the gold score of one sampled answer; `best_of_k`: the
     mean over prompts of the best gold of its K answers, what a perfect judge picking among SFT's own answers
     would reach; `rm_pick`: the gold of the answer the newest reward model scores highest.
  2. Does the reward model know the gold order? Each round's reward model on its own held-out comparisons
     (the prompts `alignloop reward` held out, chosen as it chooses them): the share of pairs of answers of
     different gold that it orders as the world's noise-free judge does.
  3. How much did RL get? The gold gain of each round's PPO policy over SFT, from eval.json (the dev results
     when the run evaluated on dev, else the test ones: labelled).

Reading it: where best-of-K is far above the mean but PPO gains little, the reward model (a low accuracy, a
poor pick) or RL loses the gain; where best-of-K is close to the mean, sampling has no headroom, and feedback
on the policy's own answers has little to choose from.

The table functions are pure and torch-free; `run` loads the models (torch is imported there).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from alignloop import evaljson

K = 6             # answers per dev prompt: the sample step's default K, what the labelers choose among
N_PROMPTS = 200   # dev prompts sampled (≈ 40 per category): 1,200 answers, a few seconds on the tiny preset
READING = ("Where best-of-K is far above the SFT mean but PPO gains little, the reward model or RL loses the "
           "gain (a low gold-order accuracy or a poor RM pick points at the reward model, a good one at RL); "
           "where best-of-K is close to the mean, sampling has no headroom: the policy's own answers offer "
           "little to choose from.")


# ---------------------------------------------------------------- pure parts


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def sample_summary(categories: list[str], golds: list[list[float]], rm: list[list[float]] | None = None) -> dict:
    """Per category and "all": n_prompts, `mean` (over every answer: the gold of one sampled answer),
    `best_of_k` (over prompts, the best gold of each prompt's answers) and, with reward-model scores, `rm_pick`
    (over prompts, the gold of the answer the RM scores highest; the first of equal best, as eval's best-of-n)."""
    picks = [None] * len(golds) if rm is None else [
        g[max(range(len(s)), key=lambda j: (s[j], -j))] for g, s in zip(golds, rm)]
    out = {}
    for cat in sorted(set(categories)) + ["all"]:
        mine = [i for i, c in enumerate(categories) if cat in (c, "all")]
        out[cat] = {"n_prompts": len(mine), "mean": _mean([x for i in mine for x in golds[i]]),
                    "best_of_k": _mean([max(golds[i]) for i in mine]),
                    "rm_pick": None if rm is None else _mean([picks[i] for i in mine])}
    return out


def order_accuracy(rm: list[float], gold: list[float]) -> tuple[int, int]:
    """(right, counted) over every pair of one prompt's answers: the reward model prefers i to j when
    rm[i] ≥ rm[j] (reward.evaluate's rule); pairs of equal gold have no right order and are not counted."""
    right = counted = 0
    for i in range(len(rm)):
        for j in range(i + 1, len(rm)):
            if gold[i] != gold[j]:
                counted += 1
                right += (gold[i] > gold[j]) == (rm[i] >= rm[j])
    return right, counted


def accuracy_by_category(items: list[tuple[str, list[float], list[float]]]) -> dict:
    """(category, RM scores, gold scores) of each held-out item → per category and "all": the RM's accuracy
    against the gold order over all counted pairs (None where no pair counts) and how many pairs counted."""
    out = {}
    for cat in sorted({c for c, _, _ in items}) + ["all"]:
        right = counted = 0
        for c, rm, gold in items:
            if cat in (c, "all"):
                r, n = order_accuracy(rm, gold)
                right, counted = right + r, counted + n
        out[cat] = {"accuracy": right / counted if counted else None, "n_pairs": counted}
    return out


def category_gains(ev: dict) -> dict:
    """{"split", "stages": {round-i/ppo: {category or "all": gold gain over SFT}}} from eval.json: the dev
    results when the run has them (this table is about dev), else the test ones. Both stages answer the same
    prompts of a split, so a difference of category means is the mean paired difference."""
    dev = ev.get("stages_dev") or {}
    split, stages = ("dev", dev) if "sft" in dev else ("test", ev.get("stages") or {})
    sft = stages.get("sft")
    names = sorted((s for s in stages if re.fullmatch(r"round-\d+/ppo", s)), key=lambda s: int(s[6:-4]))
    gains = {}
    for s in names if sft else []:
        ref = sft.get("categories") or {}
        cats = {c: b["gold_score"] - ref[c]["gold_score"] for c, b in (stages[s].get("categories") or {}).items() if c in ref}
        gains[s] = {**cats, "all": stages[s]["gold_score"] - sft["gold_score"]}
    return {"split": split, "stages": gains}


def _f(x, spec: str = ".3f") -> str:
    return "–" if x is None else f"{x:{spec}}"


def table(h: dict) -> tuple[list[str], list[list[str]]]:
    """headroom.json → (header, rows of text), one row per category and "all" last: what the main job
    prints and report.html shows (both say which split each column is on: `splits`)."""
    k, rms, gains = h["k"], h.get("rm_accuracy") or {}, h.get("gains") or {"stages": {}}
    rounds = sorted(rms, key=lambda r: int(r[6:]))
    head = (["category", "n", "SFT mean", f"best of {k}", "headroom", f"RM pick of {k}"]
            + [f"RM acc. {r}" for r in rounds] + [f"gain {s.split('/')[0]}" for s in gains["stages"]])
    rows = []
    for cat, c in h["categories"].items():
        room = None if c["mean"] is None else c["best_of_k"] - c["mean"]
        rows.append([cat, str(c["n_prompts"]), _f(c["mean"]), _f(c["best_of_k"]), _f(room, "+.3f"), _f(c["rm_pick"])]
                    + [_f((rms[r].get(cat) or {}).get("accuracy")) for r in rounds]
                    + [_f(g.get(cat), "+.3f") for g in gains["stages"].values()])
    return head, rows


def splits(h: dict) -> str:
    """Which prompts each column is measured on, in words."""
    return (f"SFT's {h['k']} answers to each of {h['categories']['all']['n_prompts']} {h['split']} prompts; "
            f"RM acc.: each round's reward model against the gold order on its held-out comparisons; "
            f"gain: each round's PPO policy over SFT on {(h.get('gains') or {}).get('split', '?')} prompts")


def format_lines(h: dict) -> list[str]:
    """The table as aligned text lines (the main job's final output)."""
    head, rows = table(h)
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    return ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
            for r in [head, *rows]]


def covers(out: Path, rounds: int) -> bool:
    """headroom.json exists and holds every round's reward model: the step is done (more rounds redo it)."""
    path = Path(out) / "headroom.json"
    if not path.exists():
        return False
    have = json.loads(path.read_text(encoding="utf-8")).get("rm_accuracy") or {}
    return all(f"round-{i}" in have for i in range(1, rounds + 1))


# ---------------------------------------------------------------- the step (torch)


def run(out: Path, ecfg, reward_cfgs: list) -> Path:
    """Sample, score and tabulate (see the module's docstring); `ecfg` is eval's config (temperature,
    length, seed, device), `reward_cfgs` each round's reward config (its sources and held-out split)."""
    from alignloop.evaluate import newest_reward_model
    from alignloop.io import write_json
    from alignloop.model import pick_device
    from alignloop.scoring import RewardScorer
    from alignloop.world import load_world
    world = load_world(out)
    prompts = world.prompts("dev")[:N_PROMPTS]
    device = pick_device(ecfg.device)
    texts, golds = _sample(out / "sft", prompts, world, ecfg, device)
    rm_path = newest_reward_model(out)
    rm = None
    if rm_path is not None:
        flat = RewardScorer(rm_path, device).score_texts([p["messages"] for p in prompts for _ in range(K)],
                                                         [t for ts in texts for t in ts])
        rm = [flat[i * K:(i + 1) * K] for i in range(len(prompts))]
    data = {"split": "dev", "policy": "sft", "k": K, "temperature": ecfg.temperature,
            "max_new_tokens": ecfg.max_new_tokens, "seed": ecfg.seed,
            "rm_pick_model": None if rm_path is None else str(rm_path.relative_to(out)),
            "categories": sample_summary([p["category"] for p in prompts], golds, rm),
            "rm_accuracy": {f"round-{c.round}": _rm_accuracy(out, c, world, device) for c in reward_cfgs},
            "gains": category_gains(evaljson.read(out))}
    path = out / "headroom.json"
    write_json(path, data)
    print(f"headroom: {len(prompts)} dev prompts × {K} answers from sft/, {len(reward_cfgs)} reward models → {path}")
    return path


def _sample(policy: Path, prompts: list[dict], world, ecfg, device) -> tuple[list[list[str]], list[list[float]]]:
    """K answers to each prompt from the policy, as eval samples them (row i·K + j from seed (eval's, i·K + j)),
    and their gold scores. Plain draws, duplicates kept: best-of-K of what the policy actually samples."""
    from alignloop.engine import Engine
    from alignloop.model import load_for_inference
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(policy)
    model, device = load_for_inference(policy, str(device), ecfg.dtype)
    engine = Engine(model, tok, device, max_batch=ecfg.batch_size)
    ids = [tok.render_prompt(p["messages"]) for p in prompts]
    outs = engine.generate([x for x in ids for _ in range(K)], max_new_tokens=ecfg.max_new_tokens,
                           temperature=ecfg.temperature, seed=ecfg.seed)
    texts = [[o.text.strip() for o in outs[i * K:(i + 1) * K]] for i in range(len(prompts))]
    return texts, [[world.gold_score(p, t) for t in ts] for p, ts in zip(prompts, texts)]


def _heldout_groups(out: Path, cfg, tok) -> list:
    """The comparisons `alignloop reward --round i` held out, chosen as reward.run chooses them: its files
    and sources, the agreement filter, the length limit, then `split_groups`."""
    from alignloop.train import pairs
    sources = pairs.parse_sources(cfg.sources)
    paths = ([Path(p.strip()) for p in cfg.data.split(",") if p.strip()] if cfg.data
             else pairs.default_data(out, cfg.round, sources))
    groups = [g for p in paths for g in pairs.read_comparisons(p, cfg.skip_invalid)]
    groups = pairs.by_agreement([g for g in groups if not g.origin or g.origin in sources], cfg.min_agreement)
    kept = [g for g in groups if g.pairs and max(len(tok.render(g.prompt + [{"role": "assistant", "content": c}])[0])
                                                 for c in g.completions) <= cfg.max_len]
    return pairs.split_groups(kept, cfg)[1]


def _rm_accuracy(out: Path, cfg, world, device) -> dict:
    """Round `cfg.round`'s reward model against the gold order on its held-out items, per category. Each item
    (prompt and answers) once, though two labelers ranked it; items of prompts not in the world are skipped."""
    from alignloop.scoring import RewardScorer
    from alignloop.world import SPLITS
    scorer = RewardScorer(out / f"round-{cfg.round}" / "reward", device)
    by_id = {p["id"]: p for s in SPLITS for p in world.prompts(s)}
    items = {}
    for g in _heldout_groups(out, cfg, scorer.tok):
        if g.prompt_id in by_id:
            items.setdefault((json.dumps(g.prompt), tuple(g.completions)), g)
    groups = list(items.values())
    flat = scorer.score_texts([g.prompt for g in groups for _ in g.completions], [c for g in groups for c in g.completions])
    rows, o = [], 0
    for g in groups:
        p = by_id[g.prompt_id]
        rows.append((p["category"], flat[o:o + len(g.completions)], [world.gold_score(p, c) for c in g.completions]))
        o += len(g.completions)
    return accuracy_by_category(rows)
