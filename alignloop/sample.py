"""Sampling for labeling (`alignloop sample`): K completions per prompt from a policy, through the engine.

Writes RUN/round-<i>/samples.jsonl: `{"prompt_id", "prompt": messages, "completions": [K distinct
answers], "policy", "sampling": {...}}`. Duplicates are re-drawn (a ranking of two equal answers
carries no information) and dropped if they keep coming; a prompt left with fewer than 2 is skipped.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from alignloop import dist
from alignloop.config import DTYPES, option
from alignloop.errors import InputError
from alignloop.io import read_records, write_jsonl
from alignloop.rundir import current_policy, resolve_path, round_dir, save_stage_config
from alignloop.tokenizer import validate_messages

SECTION = "sample"


@dataclass
class Config:
    round: int = option(1, "round number: output goes to RUN/round-<round>/", min=1)
    prompts: str = option("", "prompts file (default: the run's world/prompts-train.jsonl)")
    policy: str = option("", "model folder or .gguf file to sample from (default: the run's newest policy)")
    n_prompts: int = option(800, "how many prompts to sample for (a fresh random subset each round)", min=1)
    k: int = option(6, "completions per prompt (InstructGPT: 4 to 9; more pairs per forward pass)", min=2, max=9)
    temperature: float = option(1.0, "sampling temperature", min=0.01, max=5.0)
    top_p: float = option(1.0, "nucleus sampling mass", min=0.01, max=1.0)
    max_new_tokens: int = option(48, "answer length limit in tokens", min=1)
    batch_size: int = option(128, "rows per generation batch", min=1)
    seed: int = option(0, "seed of the prompt subset and of sampling")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "weights in memory: auto = bfloat16 on CUDA, float32 on the CPU", choices=DTYPES)


PRESETS = {"micro": dict(n_prompts=40, max_new_tokens=24), "tiny": {}, "small": dict(n_prompts=2000, batch_size=256)}


def read_prompts(path: Path) -> list[dict]:
    """`{"prompt"}` (a string or messages) or `{"messages"}` records → `{"id", "messages", …}`."""
    out = []
    for line, rec in read_records(path):
        if "messages" in rec:
            msgs = rec["messages"]
        elif "prompt" in rec:
            p = rec["prompt"]
            msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
        else:
            raise InputError("expected 'prompt' or 'messages'", file=path, line=line, field="prompt")
        msgs = validate_messages(msgs, path, line)
        if msgs[-1]["role"] != "user":
            raise InputError("a prompt must end with a user turn", file=path, line=line, field="messages")
        out.append({**rec, "id": str(rec.get("id", f"line-{line}")), "messages": msgs, "_line": line})
    return out


def distinct_answers(engine, prompts: list[list[int]], k: int, *, max_new_tokens: int, temperature: float,
                     top_p: float, tries: int, seed: int | None = None) -> list[list[str]]:
    """Up to `k` distinct non-empty answers to each prompt (token ids), for `alignloop sample` and the
    labeling app's sampler: a ranking of two equal (or empty) answers teaches the reward model nothing, and
    `alignloop reward` rejects it. The missing answers are drawn again, `tries` draws in all; a prompt can
    end with fewer than `k`.

    `seed`: row r of draw t samples from `row_seed(seed + t, r)`, the generator one process gives it; under
    torchrun each rank draws rows rank, rank + N, … of a draw and every rank gets every answer back in row
    order, so all of them keep the same answers, those of one process, and agree on what the next draw
    re-draws. None: fresh randomness at every call."""
    from alignloop.engine import row_seed

    got: list[list[str]] = [[] for _ in prompts]
    for t in range(tries):
        rows = [i for i, g in enumerate(got) for _ in range(k - len(g))]
        if not rows:
            break
        mine = dist.part(list(range(len(rows))))
        outs = engine.generate([prompts[rows[r]] for r in mine], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p,
                               seed=None if seed is None else [row_seed(seed + t, r) for r in mine])
        texts, = dist.gather_rows(mine, [o.text.strip() for o in outs])
        for i, text in zip(rows, texts):
            if text and text not in got[i] and len(got[i]) < k:
                got[i].append(text)
    return got


def run(cfg: Config, out: Path) -> Path:
    from alignloop.engine import Engine
    from alignloop.model import load_for_inference
    from alignloop.sources import resolve_model, tokenizer_dir
    from alignloop.tokenizer import ChatTokenizer

    device = dist.setup(cfg)  # under torchrun (`alignloop sample`, or a step of `alignloop run`): joins the group once
    prompts_path = resolve_path(cfg.prompts, out, "world/prompts-train.jsonl")
    prompts = read_prompts(prompts_path)
    policy = resolve_model(cfg.policy, out, field="policy") if cfg.policy else current_policy(out)
    if policy is None:
        raise InputError("no policy to sample from: train one first or give --policy", file=out)
    rng = random.Random(cfg.seed * 7919 + cfg.round)
    chosen = rng.sample(prompts, min(cfg.n_prompts, len(prompts)))
    tok = ChatTokenizer.load(tokenizer_dir(policy, out))
    model, device = load_for_inference(policy, device, cfg.dtype)
    engine = Engine(model, tok, device, max_batch=cfg.batch_size)
    ids = [tok.render_prompt(p["messages"]) for p in chosen]
    too_long = [p for p, x in zip(chosen, ids) if len(x) + 8 > engine.ctx]
    if too_long:
        raise InputError(f"{len(too_long)} prompts leave no room to answer in the {engine.ctx}-token context "
                         f"(first: id {too_long[0]['id']})", file=prompts_path, line=too_long[0]["_line"], field="prompt")
    # Re-drawn a couple of times; each draw's seed is its own, so a re-draw brings new answers.
    answers = distinct_answers(engine, ids, cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, tries=3, seed=cfg.seed * 1000 + cfg.round * 10)
    records = [{"prompt_id": p["id"], "prompt": p["messages"], "completions": a, "policy": str(policy),
                "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}}
               for p, a in zip(chosen, answers) if len(a) >= 2]
    dest = round_dir(out, cfg.round) / "samples.jsonl"
    if dist.is_main():  # every rank holds every answer; one writes them
        write_jsonl(dest, records)
        save_stage_config(out, SECTION, cfg)
    print(f"sample: {len(records)} prompts × up to {cfg.k} answers from {policy} → {dest}")
    return dest
