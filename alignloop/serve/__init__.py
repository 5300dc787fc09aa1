"""`alignloop serve`: talk to every stage of a run — a chat page, an arena and an OpenAI-compatible API.

    alignloop serve RUN_OR_MODEL [--model NAME=PATH …] [--host 127.0.0.1] [--port 8000] [--device auto]
                    [--dtype auto] [--temperature 1.0] [--top-p 1.0] [--api-key KEY …] [--db URL] [--max-batch 32]
                    [--max-queue 256] [--request-timeout 300] [--max-tokens-limit 1024] [--max-n 8]
                    [--open] [--messages-per-minute 20] [--battles-per-minute 10] [--votes-per-minute 20]
    alignloop serve export RUN_DIR [--out FILE] [--feedback-out FILE] [--format pairs|rankings] [--db URL]

A run directory serves each of its stages by name (`base`, `sft`, `round-1/ppo`, …, `ppo` = newest);
a plain Hugging Face model folder under its folder name, a `.gguf` file (converted once into a folder,
see alignloop/sources.py) under its file name; `--model NAME=PATH` adds more.
Conversations, thumbs and arena votes go to the run's database (RUN/alignloop.db by default), and
`serve export` turns them into pairs / rankings for the next reward model (new versioned files, each
comparison with its source, voter and time; the reward stage reads them only with `--sources chat,arena`).

The chat page and the arena need an account of the run (the labeling app's accounts and sessions:
`alignloop label create-admin RUN`, then more accounts on its Accounts page); `--open` allows anonymous
use instead, for a private demo, and the pages say so. The API keeps its own keys (`--api-key`).

Layout: `app.py` (the OpenAI API; builds the app), `routes/` (login, chat page, arena: one router
each) + `web.py` (what they share: the account gate, rate limits) + templates/static, `scheduler.py`
(generation jobs: validation, the bounded queue, batching), `errors.py` (OpenAI's error shape),
`settings.py` (what is served and how), `tables.py` (database), `arena.py` (Bradley–Terry), `export.py`.
Imports go one way: app → routes → web → scheduler → errors, settings.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from alignloop.errors import InputError


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"expected NAME=PATH, got {spec!r}", field="--model")
        out[name.strip()] = Path(path.strip())
    return out


def resolve_models(target: Path | None, extra: dict[str, Path]) -> tuple[dict[str, Path], Path]:
    """({name: model dir}, the run directory whose database and tokenizer to use). A `.gguf` file is
    converted once into a folder: into the run when a run directory is served (RUN/models/<stem>),
    else into the cache (alignloop/sources.py)."""
    from alignloop.rundir import stage_models
    from alignloop.sources import resolve_model
    if target is not None and not target.exists():
        raise InputError("no such run, model folder or .gguf file", file=target)
    is_run = target is not None and target.is_dir() and not (target / "config.json").exists()
    models: dict[str, Path] = {}
    if is_run:
        models.update(stage_models(target))
        if not models:
            raise InputError("neither a Hugging Face model folder (config.json) nor a run directory with a "
                             "finished stage (pretrain/, sft/, round-N/ppo/)", file=target)
    elif target is not None:
        models[target.stem if target.is_file() else target.resolve().name] = resolve_model(target, field="RUN_OR_MODEL")
    for name, path in extra.items():
        models[name] = resolve_model(path, target if is_run else None, field=f"--model {name}")
    if not models:
        raise InputError("nothing to serve: give a run directory, a model folder or a .gguf file, or --model "
                         "NAME=PATH", field="RUN_OR_MODEL")
    if is_run:
        return models, target
    # a stage folder of a run (RUN/sft) shares the run's database and tokenizer; a lone model keeps its own
    first = next(iter(models.values()))
    return models, first.parent if (first.parent / "tokenizer").is_dir() else first


def load_models(models: dict[str, Path], run_dir: Path, max_batch: int = 32, device: str = "auto",
                dtype: str = "auto") -> dict:
    """Load each folder once (`ppo` and `round-N/ppo` share one engine)."""
    from alignloop.engine import Engine
    from alignloop.model import load_for_inference
    from alignloop.serve.settings import Served
    from alignloop.sources import tokenizer_dir
    from alignloop.tokenizer import ChatTokenizer

    loaded: dict[Path, Served] = {}
    out = {}
    for name, path in models.items():
        key = path.resolve()
        if key not in loaded:
            tok = ChatTokenizer.load(tokenizer_dir(path, run_dir))
            model, dev = load_for_inference(path, device, dtype)
            loaded[key] = Served(name, path, Engine(model, tok, dev, max_batch=max_batch), tok)
        s = loaded[key]
        out[name] = Served(name, path, s.engine, s.tok)
    return out


def build_parser() -> argparse.ArgumentParser:
    from alignloop.config import add_device_arguments
    p = argparse.ArgumentParser(prog="alignloop serve", description="serve a chat page, an arena and an "
                                "OpenAI-compatible API (`alignloop serve export RUN` writes the feedback)")
    p.add_argument("target", metavar="RUN_OR_MODEL", nargs="?", type=Path,
                   help="a run directory (every stage is served by name), a Hugging Face model folder or a .gguf file")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="serve another model folder or .gguf file under NAME")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_device_arguments(p)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (repeatable; also $ALIGNLOOP_API_KEYS, "
                        "comma-separated, which keeps keys out of the process list)")
    p.add_argument("--db", metavar="URL", help="database URL (default: sqlite RUN/alignloop.db)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per engine call; n=k counts k rows")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting to start (n=k counts once); more at once are answered 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a request that waits this long without starting is answered 503 (0: no limit; the "
                        "default is under the openai client's own 600 s, so the client hears why)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--max-n", type=int, default=8, help="the largest n a request may ask")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for the engine (default: one fewer than the cores, at least 1)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of a request that sets none, as the chat page's (default 1.0, as "
                        "OpenAI's API; a small model answers more sensibly at 0-0.3)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of a request that sets none (default 1.0)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="before a batch starts, wait this long while requests keep arriving (at most 10 times)")
    p.add_argument("--open", action="store_true",
                   help="let anyone use the chat page and the arena without an account (a private demo; the pages "
                        "say so and the feedback is recorded as anonymous). Default: the run's accounts")
    p.add_argument("--messages-per-minute", type=int, default=20,
                   help="chat messages and regenerations per account a minute (per address: 4 times as many)")
    p.add_argument("--battles-per-minute", type=int, default=10, help="arena battles per account a minute (per "
                   "address: 4 times as many)")
    p.add_argument("--votes-per-minute", type=int, default=20, help="arena votes per account a minute (per "
                   "address: 4 times as many)")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignloop serve export", description="write chat thumbs and arena votes "
                                "as reward-model data (pairs or rankings) and single thumbs as feedback")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="comparisons, a new file (default: RUN/round-N/chat-pairs-<time>.jsonl, N the newest round)")
    p.add_argument("--feedback-out", type=Path, metavar="FILE",
                   help="thumbs on answers outside any pair, a new file (default: RUN/round-N/chat-feedback-<time>.jsonl)")
    p.add_argument("--format", choices=("pairs", "rankings"), default="pairs",
                   help="pairs {prompt, chosen, rejected} or K=2 rankings with the labeler's pseudonym")
    p.add_argument("--db", metavar="URL", help="database URL (default: sqlite RUN/alignloop.db)")
    return p


def main(argv: list[str]) -> None:
    if argv and argv[0] == "export":
        args = export_parser().parse_args(argv[1:])
        from alignloop.serve.export import export
        r = export(args.run_dir, args.db, args.out, args.feedback_out, args.format)
        c = r["counts"]
        print(f"serve export into {r['folder']}: {r['n_comparisons']} comparisons ({c.get('regenerate_pairs', 0)} "
              f"from regenerate thumbs, {c.get('arena_pairs', 0)} from arena votes; {c.get('ties', 0)} ties / "
              f"both-bad and {c.get('skipped_pairs', 0)} identical or empty answers skipped), "
              f"{r['n_thumbs']} single thumbs; new files, earlier ones unchanged")
        for kind, path in r["files"].items():
            print(f"  {kind} → {path}")
        return
    args = build_parser().parse_args(argv)
    from alignloop.config import check_number
    for flag, v, lo, hi in (("--max-batch", args.max_batch, 1, None), ("--max-tokens-limit", args.max_tokens_limit, 1, None),
                            ("--max-queue", args.max_queue, 1, None), ("--request-timeout", args.request_timeout, 0, None),
                            ("--max-n", args.max_n, 1, None), ("--port", args.port, 1, 65535),
                            ("--batch-window-ms", args.batch_window_ms, 0, None), ("--threads", args.threads, 0, None),
                            ("--temperature", args.temperature, 0, 2), ("--top-p", args.top_p, 0.01, 1),
                            ("--messages-per-minute", args.messages_per_minute, 1, None),
                            ("--battles-per-minute", args.battles_per_minute, 1, None),
                            ("--votes-per-minute", args.votes_per_minute, 1, None)):
        check_number(v, flag, min=lo, max=hi)  # NaN and ±inf too
    if args.db is not None:  # a bad URL is said now, not after the models have loaded
        from alignloop.db import check_url
        check_url(args.db)
    keys = args.api_key + [k.strip() for k in os.environ.get("ALIGNLOOP_API_KEYS", "").split(",") if k.strip()]
    models, run_dir = resolve_models(args.target, parse_model_specs(args.model))

    import uvicorn

    from alignloop.db import connect, database_url, migrate, sessions
    from alignloop.serve.app import Settings, create_app

    import torch
    # One core is the HTTP event loop's. Intra-op threads on every core fight it (and anything else on
    # the machine): on a busy 2-core CPU the micro model decoded 8-10x slower with 2 threads than with 1.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    served = load_models(models, run_dir, args.max_batch, args.device, args.dtype)
    db = connect(database_url(run_dir, args.db))
    migrate(db)
    app = create_app(served, Settings(api_keys=keys, max_batch=args.max_batch, max_queue=args.max_queue,
                                      request_timeout=args.request_timeout,
                                      max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
                                      gather_s=args.batch_window_ms / 1000, temperature=args.temperature,
                                      top_p=args.top_p, open=args.open,
                                      messages_per_minute=args.messages_per_minute,
                                      battles_per_minute=args.battles_per_minute,
                                      votes_per_minute=args.votes_per_minute), db)
    url = f"http://{args.host}:{args.port}"
    print(f"serve: {', '.join(served)} on {url}  (chat page /, arena /arena, OpenAI API {url}/v1"
          f"{', API keys required' if keys else ''})", flush=True)
    if args.open:
        print("serve: --open: anyone who reaches this server may chat and vote without an account", flush=True)
    else:
        from sqlalchemy import func, select

        from alignloop.accounts.models import User
        with sessions(db)() as s:
            if not s.scalar(select(func.count()).select_from(User)):
                print(f"serve: no accounts yet: the chat page and the arena need one (`alignloop label "
                      f"create-admin {run_dir} --username NAME`), or serve with --open", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
