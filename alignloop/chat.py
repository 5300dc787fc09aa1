"""`alignloop chat RUN_OR_MODEL`: a multi-turn conversation in the terminal, streamed token by token.

RUN_OR_MODEL is a run directory, a Hugging Face model folder or a `.gguf` file (converted once, see
alignloop/sources.py). For a run directory it talks to the newest policy (PPO, else SFT, else the base
model) unless `--stage` names another. `/reset` starts over, `/quit` (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignloop.errors import InputError


def pick_model(path: Path, stage: str | None) -> tuple[Path, Path | None]:
    """(model folder, its run directory or None) for what the user named."""
    from alignloop.rundir import current_policy, stage_models
    from alignloop.sources import resolve_model
    if path.suffix.lower() == ".gguf" or (path / "config.json").exists() or not path.is_dir():
        return resolve_model(path, field="RUN_OR_MODEL"), None
    if stage:
        models = stage_models(path)
        if stage not in models:
            raise InputError(f"no stage {stage!r} in this run (has: {', '.join(models) or 'none'})", file=path, field="stage")
        return models[stage], path
    found = current_policy(path)
    if found is None:
        raise InputError("neither a model folder nor a run directory with a trained model", file=path)
    return found, path


def fit(tok, messages: list[dict], keep: int, ctx: int, room: int) -> tuple[list[dict], int]:
    """(messages, turns dropped): the conversation with its oldest exchanges (a user message and its answer)
    dropped until its prompt leaves `room` tokens of the context `ctx` for the answer, or until only the
    newest message is left. The first `keep` messages (the system prompt) are never dropped. Whether what is
    left fits at all is the caller's to check (`len(tok.render_prompt(...)) < ctx`)."""
    messages, dropped = list(messages), 0
    while len(messages) - keep > 1 and len(tok.render_prompt(messages)) + room > ctx:
        del messages[keep:keep + 2]
        dropped += 1
    return messages, dropped


def main(argv: list[str]) -> None:
    from alignloop.config import add_device_arguments
    p = argparse.ArgumentParser(prog="alignloop chat", description="talk to a model in the terminal")
    p.add_argument("path", metavar="RUN_OR_MODEL", help="a run directory, a Hugging Face model folder or a .gguf file")
    p.add_argument("--stage", help="for a run directory: base, sft, ppo, round-N/ppo (default: the newest)")
    p.add_argument("--system", default="", help="a system message to start every conversation with")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_device_arguments(p)
    args = p.parse_args(argv)
    from alignloop.config import check_number
    check_number(args.temperature, "--temperature", min=0, max=2)  # the bounds of `alignloop serve`
    check_number(args.top_p, "--top-p", min=0.01, max=1)
    check_number(args.max_new_tokens, "--max-new-tokens", min=1)
    interactive = sys.stdin.isatty()  # piped input: a message that cannot be sent ends the session (exit 2)

    from alignloop.engine import Engine
    from alignloop.model import load_for_inference
    from alignloop.sources import tokenizer_dir
    from alignloop.tokenizer import ChatTokenizer

    model_dir, run_dir = pick_model(Path(args.path), args.stage)
    tok = ChatTokenizer.load(tokenizer_dir(model_dir, run_dir))
    model, device = load_for_inference(model_dir, args.device, args.dtype)
    engine = Engine(model, tok, device, max_batch=1)
    start = [{"role": "system", "content": args.system}] if args.system else []
    ctx = engine.ctx
    room = min(args.max_new_tokens, ctx // 2)  # old turns make way for an answer this long
    least = len(tok.render_prompt(start + [{"role": "user", "content": ""}]))
    if start and least >= ctx:
        raise InputError(f"the system prompt is {len(tok.encode(args.system))} tokens; with the chat format it "
                         f"needs {least}, more than this model's context of {ctx} tokens leaves for a message",
                         field="--system")
    messages = list(start)
    print(f"alignloop chat with {model_dir} — /reset to start over, /quit to leave", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            messages = list(start)
            print("(a new conversation)", flush=True)
            continue
        asked, dropped = fit(tok, messages + [{"role": "user", "content": text}], len(start), ctx, room)
        need = len(tok.render_prompt(asked))
        if need >= ctx:  # even alone (with the system prompt) it does not fit: not sent, the history kept
            why = (f"the message is {len(tok.encode(text))} tokens; with the "
                   f"{'system prompt and the ' if start else ''}chat format it needs {need}, and this model's "
                   f"context holds at most {ctx - 1} before the answer: write a shorter one")
            if not interactive:
                raise InputError(why, field="message")
            print(f"(not sent: {why})", flush=True)
            continue
        if dropped:
            print(f"(the conversation no longer fits the context of {ctx} tokens: the oldest {dropped} "
                  f"exchange{'s were' if dropped > 1 else ' was'} dropped{'; the system prompt is kept' if start else ''})",
                  flush=True)
        messages = asked
        sys.stdout.write("assistant> ")
        sys.stdout.flush()

        def stream(_, piece):
            sys.stdout.write(piece)
            sys.stdout.flush()
        out = engine.chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, on_token=stream)
        print(flush=True)
        messages.append({"role": "assistant", "content": out.text.strip() or "…"})
