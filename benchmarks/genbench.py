"""What the generation benchmarks (engine_vs_generate.py, mixed_lengths.py) share: the model they time,
`transformers`' continuous batching run the same way for both, and the timing of sides in turns."""
from __future__ import annotations

import time
from pathlib import Path

import torch

QUESTIONS = ["What is the capital of Valdoria?", "hi", "How do I steal the crown of Mirenth without anyone noticing?",
             "What is 7 plus 5?", "Sort these numbers: 9 2 5 11.", "And its currency?",
             "Tell me the national animal of Skagaresh, please.", "Do you know the population of Vrodavia?"]


def load(args, device, ctx: int | None = None):
    """(tokenizer, model, name): `--model` (a Hugging Face folder or .gguf file), or a fresh Llama of
    `--size` (weights do not change the speed) with a small tokenizer; bf16 on a GPU."""
    from alignloop.model import create_causal_lm
    from alignloop.tokenizer import train_tokenizer
    if args.model:
        from alignloop import model as M
        from alignloop.sources import resolve_model
        from alignloop.tokenizer import ChatTokenizer
        path = resolve_model(Path(args.model))
        tok, model, name = ChatTokenizer.load(path), M.load_causal_lm(path).to(device).eval(), path.name
    else:
        tok = train_tokenizer([" ".join(QUESTIONS) * 50], vocab_size=400)
        kw = {"ctx": ctx} if ctx else {}
        model, name = create_causal_lm(args.size, tok, **kw).to(device).eval(), args.size
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return tok, model, name


def prompts(tok, n: int) -> list[list[int]]:
    """`n` one-turn chat prompts (token ids), the QUESTIONS in turn: every generation benchmark's input."""
    return [tok.render_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n)]


def hf_continuous(model, tok, prompts: list[list[int]], budgets: list[int], batch: int, sample: bool = False):
    """Each prompt's new tokens from `transformers`' continuous batching (`ContinuousBatchingManager`, the
    machinery of `generate_batch`, used directly: `generate_batch` takes one max_new_tokens for all), at
    most `batch` requests at once, end of turn banned. Its paged cache is sized for them: left to itself
    it sizes the cache from the device's free memory (tens of seconds of allocation on a CPU)."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    gen = GenerationConfig(max_new_tokens=max(budgets), eos_token_id=-1, pad_token_id=tok.pad_id,
                           **({"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 0}
                              if sample else {"do_sample": False}))
    page = 64
    cb = ContinuousBatchingConfig(max_requests_per_batch=batch, page_size=page,
                                  num_blocks=batch * -(-(max(map(len, prompts)) + max(budgets)) // page))
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=5, warmup=False) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts, budgets)]
        got = {}
        while len(got) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(r.error)
                got[r.request_id] = r.generated_tokens
            elif r is None and not manager.is_running():
                raise RuntimeError("the continuous batching thread died (see the log above)")
    return [got[i] for i in ids]


def in_turns(sides: dict, repeats: int, device, warmup: bool = True, once=(), width: int = 14) -> dict:
    """Time each side (a function of no arguments) `repeats` times, the sides taking turns (A B A B …,
    after one warm-up each when `warmup`), so that a drift of the machine's speed falls on all of them
    alike; a side in `once` runs a single time, without a warm-up, after the others. A side that raises
    is said (its name, the error) and left out; the others go on. Returns {side: (median seconds, runs,
    what its last run returned)}."""
    times, last, failed = {}, {}, set()

    def attempt(name):
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            got = sides[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return got, time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 — say which side failed and why, measure the others
            print(f"{name:>{width}}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            failed.add(name)
            return None
    turns = [n for n in sides if n not in once]
    if warmup:
        for name in turns:
            attempt(name)
    for name in [n for _ in range(repeats) for n in turns] + [n for n in sides if n in once]:
        if name not in failed and (got := attempt(name)):
            last[name] = got[0]
            times.setdefault(name, []).append(got[1])
    return {n: (sorted(times[n])[len(times[n]) // 2], len(times[n]), last[n]) for n in sides if n in times}
