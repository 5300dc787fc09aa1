"""Evaluation of a policy with the world's simulated labelers (`alignloop eval`).

The policy answers every test prompt once (the split no training file contains; dev is for tuning),
sampled at temperature 1 by default — the policy as PPO trains it, so that gold score, diversity and the
KL to SFT are all measured on the same samples.
The world's judge (who knows the gold truth) scores each answer. Results go into RUN/eval.json under
`stages.<name>` in the shape docs/formats.md ("eval.json") fixes. Every `ci95` entry is a 95% interval [lo, hi] (a rate's
Wilson interval is not symmetric about the rate); `kl_exact` is the exact per-token KL to SFT summed over
each answer — not PPO's `kl_sampled`, the log-ratio of the sampled tokens on its rollout batch — at the
temperature T the answers were sampled at (both models' logits / T; none at T = 0, greedy), stored beside
it as `temperature`.

Best-of-n (`--best-of N`, N > 1): the policy answers every prompt N times (row j of prompt i with the
engine's seed `row_seed(seed, i·N + j)`, so N = 1 is the ordinary evaluation), the reward model scores the
N answers and the best one (the first of equal best) is the answer judged. Stored as stage `bo<N>` (a
`--stage` other than sft: `<stage>/bo<N>`), with `best_of` and, in place of a measured KL, the analytic
bound KL(π_bo‖π) ≤ log N − (N−1)/N (Stiennon et al. 2020; Beirami et al. 2024) as `kl_bound`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from alignloop import dist
from alignloop import evaljson
from alignloop.config import DTYPES, option
from alignloop.errors import InputError
from alignloop.stats import best_of_n_kl, distinct_n, fmt_interval, interval, mean_ci, pick_best, wilson_interval

SECTION = "eval"


@dataclass
class Config:
    stage: str = option("sft", "the stage's name in eval.json (base, sft, ppo, round-2/ppo, …)")
    model: str = option("", "model folder or .gguf file (default: the run's folder of that stage; base → pretrain/)")
    reference: str = option("", "model to measure the KL against (default: the run's sft/ when it exists)")
    reward_model: str = option("", "reward model for rm_score (default: the newest round's reward/)")
    split: str = option("test", "world prompt split to score (test: what is reported; dev: for tuning)",
                        choices=("test", "dev", "train"))
    max_prompts: int = option(0, "score at most this many prompts (0: all)", min=0)
    temperature: float = option(1.0, "sampling temperature (0: greedy)", min=0.0, max=5.0)
    max_new_tokens: int = option(48, "answer length limit in tokens", min=1)
    batch_size: int = option(64, "prompts per generation batch", min=1)
    seed: int = option(1234, "sampling seed")
    best_of: int = option(1, "best-of-n: sample N answers per prompt and keep the reward model's best (stage bo<N>; 1: off)",
                          min=1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "weights in memory: auto = bfloat16 on CUDA, float32 on the CPU", choices=DTYPES)


PRESETS = {"micro": {"max_new_tokens": 32}, "tiny": {}, "small": {"batch_size": 256}}


# ---------------------------------------------------------------- summaries (the statistics: alignloop/stats.py)


def bo_stage(stage: str, n: int) -> str:
    """eval.json's name of best-of-n on a stage: bo16 (of sft), round-1/ppo/bo16 (of another stage)."""
    return stage if n == 1 else f"bo{n}" if stage == "sft" else f"{stage}/bo{n}"


def summarise(judgements: list, categories: list[str]) -> dict:
    """gold_score, helpful/truthful/harmless rates and their 95% intervals [lo, hi], overall and per category."""
    def block(js):
        n = len(js)
        m, half = mean_ci([j.score for j in js])
        out = {"gold_score": m, "n_prompts": n, "ci95": {"gold_score": interval(m, half)}}
        for crit in ("helpful", "truthful", "harmless"):
            k = sum(bool(getattr(j, crit)) for j in js)
            out[crit] = k / n if n else 0.0
            out["ci95"][crit] = list(wilson_interval(k, n))
        return out
    res = block(judgements)
    res["categories"] = {c: block([j for j, jc in zip(judgements, categories) if jc == c])
                         for c in sorted(set(categories))}
    return res


# ---------------------------------------------------------------- measurements


@torch.no_grad()
def fact_recall(model, tok, probes: list[tuple[str, str]], device=None, batch_size: int = 128) -> float:
    """Share of facts whose encyclopedic sentence start ("The capital of X is") the model completes
    greedily with the right value."""
    from alignloop.engine import Engine
    engine = Engine(model, tok, device, max_batch=batch_size)
    prompts = [tok.bos_ids + tok.encode(prefix) for prefix, _ in probes]
    outs = engine.generate(prompts, max_new_tokens=8, temperature=0.0)
    ok = sum(bool(re.match(r"\s*(the\s+)?" + re.escape(v.lower()) + r"\b", o.text.lower()))
             for (_, v), o in zip(probes, outs))
    return ok / max(1, len(probes))


@torch.no_grad()
def sequence_kl(policy, reference, prompt_ids, answer_ids, device, tok, batch_size: int = 32,
                temperature: float = 1.0) -> list[float]:
    """KL(π‖π_ref) of each answer: Σ over its positions of the exact KL between the two next-token
    distributions (as the engine samples them: padded vocabulary rows and <|pad|> excluded, both models'
    logits divided by `temperature` — pass the temperature the answers were sampled at, so that π is the
    distribution they came from). Summed along a trajectory sampled from π this estimates the sequence KL
    without bias, is never negative, and has far less variance than the log-ratio of the sampled tokens
    alone. Temperature 0 (greedy) has no such distribution: a ValueError."""
    if not temperature > 0:
        raise ValueError(f"the exact KL needs a sampling temperature > 0, not {temperature} (greedy answers "
                         "come from no distribution to compare)")
    from alignloop.forward import allowed_tokens, right_padded
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        ps, ans = prompt_ids[s:s + batch_size], answer_ids[s:s + batch_size]
        ids, att = right_padded([p + a for p, a in zip(ps, ans)], tok.pad_id, device)

        def logp(model):
            z = model(input_ids=ids, attention_mask=att).logits.float() / temperature
            z = z.masked_fill(~allowed_tokens(tok, z.shape[-1], z.device), float("-inf"))  # the engine's vocabulary
            return torch.log_softmax(z, -1)
        lp, lq = logp(policy), logp(reference)
        kl = (lp.exp() * (lp - lq).nan_to_num(0.0, 0.0, 0.0)).sum(-1)                    # (B, T)
        for i, (p, a) in enumerate(zip(ps, ans)):
            out.append(float(kl[i, len(p) - 1: len(p) - 1 + len(a)].sum()))
    return out


def evaluate_policy(model, tok, world, cfg: Config, device, reference=None, reward_fn=None) -> dict:
    """Generate on the prompts, judge with the world's gold truth, and measure KL and diversity.

    Under torchrun each rank answers prompts rank, rank + N, … and measures their KL and reward-model
    score; every rank then holds every answer (`gather_rows`), in prompt order, and summarises them. Prompt
    i draws from the generator one process gives it (`row_seed(seed, i)`) and the engine's rows do not
    depend on their batch-mates, so the answers are those of one process whatever N is."""
    from alignloop.engine import Engine, row_seed
    prompts = world.prompts(cfg.split)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    engine = Engine(model, tok, device, max_batch=cfg.batch_size)
    prompt_ids = [tok.render_prompt(p["messages"]) for p in prompts]
    mine = dist.part(list(range(len(prompts))))
    n = cfg.best_of
    outs = engine.generate([prompt_ids[i] for i in mine for _ in range(n)], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=[row_seed(cfg.seed, i * n + j) for i in mine for j in range(n)])
    kls = scores = [None] * len(mine)
    candidates = [None] * len(mine)
    if n > 1:  # best-of-n: the reward model (run() has made sure there is one) picks; the KL is analytic
        every = reward_fn([prompts[i]["messages"] for i in mine for _ in range(n)], [o.text.strip() for o in outs])
        best = pick_best(every, n)
        outs, scores = [outs[b] for b in best], [every[b] for b in best]
        candidates = [every[k * n:(k + 1) * n] for k in range(len(mine))]
        reference = reward_fn = None
    if cfg.temperature <= 0:  # greedy answers come from no distribution: no exact KL (run() says so)
        reference = None
    if reference is not None and mine:  # at the temperature the answers were sampled at: π is what sampled them
        kls = sequence_kl(model, reference, [prompt_ids[i] for i in mine], [o.ids for o in outs], device, tok,
                          temperature=cfg.temperature)
    if reward_fn is not None and mine:
        scores = reward_fn([prompts[i]["messages"] for i in mine], [o.text.strip() for o in outs])
    texts, lengths, kls, scores, candidates = dist.gather_rows(mine, [o.text.strip() for o in outs],
                                                            [len(o.ids) for o in outs], kls, scores, candidates)
    judgements = [world.judge(p, t) for p, t in zip(prompts, texts)]
    res = summarise(judgements, [p["category"] for p in prompts])
    res["distinct_2"] = distinct_n(texts, 2)
    res["mean_length"] = sum(lengths) / len(lengths)
    res["kl_exact"] = sum(kls) / len(kls) if reference is not None else None
    res["rm_score"] = sum(scores) / len(scores) if reward_fn is not None or n > 1 else None
    res["examples"] = [{"id": p["id"], "category": p["category"], "prompt": p["messages"][-1]["content"],
                        "context": p["messages"][:-1], "answer": t, "gold_score": j.score} for p, t, j in zip(prompts, texts, judgements)]
    if n > 1:
        res |= {"best_of": n, "kl_bound": best_of_n_kl(n)}
        for e, c in zip(res["examples"], candidates):
            e["rm_candidates"] = c  # the reward model's score of each of the n answers; `answer` is the best
    return res


def stage_model_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / ("pretrain" if stage == "base" else stage)


def run(cfg: Config, out: Path) -> dict:
    from alignloop.model import load_causal_lm, load_for_inference, pick_dtype
    from alignloop.sources import resolve_model, tokenizer_dir
    from alignloop.tokenizer import ChatTokenizer
    from alignloop.world import load_world

    device = dist.setup(cfg)  # under torchrun (`alignloop eval`, or a step of `alignloop run`): joins the group once
    world = load_world(out)
    rm_path = Path(cfg.reward_model) if cfg.reward_model else newest_reward_model(out)
    if cfg.best_of > 1 and rm_path is None:  # said before any model is loaded
        raise InputError("best-of-n needs a reward model to pick with: train one (alignloop reward) or give "
                         "--reward-model", file=out, field="best_of")
    path = resolve_model(cfg.model, out, field="model") if cfg.model else stage_model_dir(out, cfg.stage)
    tok = ChatTokenizer.load(tokenizer_dir(path, out))
    model, device = load_for_inference(path, device, cfg.dtype)
    ref_path = resolve_model(cfg.reference, out, field="reference") if cfg.reference else out / "sft"
    reference = None
    if cfg.stage not in ("base", "sft") and cfg.best_of == 1 and (ref_path / "config.json").exists():
        if cfg.temperature > 0:
            reference = load_causal_lm(ref_path, pick_dtype(cfg.dtype, device)).to(device)
        else:
            print("eval: no kl_exact at temperature 0: greedy answers come from no distribution to compare "
                  "with the reference's")
    reward_fn = None
    if rm_path is not None:
        from alignloop.model import load_reward_model
        from alignloop.scoring import RewardScorer
        # a trained reward model, or an InputError naming the folder (a causal LM has no trained score head);
        # frozen, so bf16 on a GPU and fp32 on the CPU, as RewardScorer keeps it
        rm = load_reward_model(rm_path, pick_dtype("auto", device)).to(device).eval().requires_grad_(False)
        reward_fn = RewardScorer(rm_path, device, model=rm).score_texts
    res = evaluate_policy(model, tok, world, cfg, device, reference, reward_fn)
    res["split"] = cfg.split
    res["temperature"] = cfg.temperature  # what the answers were sampled at, and kl_exact measured at
    name = bo_stage(cfg.stage, cfg.best_of)
    if dist.is_main():  # every rank holds the results; one writes them
        evaljson.update(out, name, res, key=evaljson.key_of(cfg.split))
    print(format_row(name, res) + ("" if cfg.split == "test" else f"  ({cfg.split} prompts)"))
    return res


def newest_reward_model(run_dir: Path) -> Path | None:
    rounds = sorted(Path(run_dir).glob("round-*/reward/config.json"), key=lambda p: int(p.parent.parent.name[6:]))
    return rounds[-1].parent if rounds else None


def format_row(stage: str, m: dict) -> str:
    ci = m["ci95"]
    kl = (f"{m['kl_exact']:.2f}" if m.get("kl_exact") is not None
          else f"≤{m['kl_bound']:.2f}" if m.get("kl_bound") is not None else "-")
    rm = f"{m['rm_score']:+.2f}" if m.get("rm_score") is not None else "-"
    rates = "  ".join(f"{c} {m[c]:.2f} {fmt_interval(ci[c], '.2f')}" for c in ("helpful", "truthful", "harmless"))
    return (f"{stage:<14} gold {m['gold_score']:.3f} {fmt_interval(ci['gold_score'])}  {rates}"
            f"  rm {rm}  kl_exact {kl}  distinct-2 {m['distinct_2']:.2f}  n {m['n_prompts']}")


def format_categories(m: dict) -> str:
    rows = []
    for c, b in m["categories"].items():
        rows.append(f"    {c:<13} gold {b['gold_score']:.3f}  helpful {b['helpful']:.2f}  truthful {b['truthful']:.2f}"
                    f"  harmless {b['harmless']:.2f}  n {b['n_prompts']}")
    return "\n".join(rows)


def require_world(run_dir: Path):
    from alignloop.world import load_world
    try:
        return load_world(run_dir)
    except InputError:
        raise InputError("evaluation needs the embedded world in the run directory (alignloop world)",
                         file=Path(run_dir) / "world") from None
