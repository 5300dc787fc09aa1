"""The `alignloop` command line: one subcommand per stage, each with `--config`, `--preset`, `--out`.

A stage module provides `Config` (a flat dataclass), `PRESETS` ({"micro"|"tiny"|"small": overrides})
and `run(cfg, out)`; this file turns those into flags, resolves the config and reports bad input.
Optional: `check(cfg)` refuses bad settings before the stage guard and any work; `section(cfg)` names the
run-directory stage the call writes when one module writes several (`ppo --algo rloo` → round-i/rloo/).
A module with its own `main(argv)` (e.g. `chat`, `serve`, `label`) parses its arguments itself.
Modules are imported only when their command runs, so `alignloop --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path

from alignloop import config
from alignloop.errors import InputError

COMMANDS = {
    "run": ("alignloop.pipeline", "the main job: the whole recipe into one run directory (resumable)"),
    "world": ("alignloop.world", "generate the embedded world: knowledge base, corpus, prompts, labelers"),
    "tokenizer": ("alignloop.tokenizer", "train a byte-level BPE tokenizer with the chat format"),
    "pretrain": ("alignloop.train.pretrain", "step 0: next-token prediction on a text corpus"),
    "sft": ("alignloop.train.sft", "step 1: supervised fine-tuning on demonstrations"),
    "eval": ("alignloop.evaluate", "score a policy on the test prompts with the simulated labelers"),
    "sample": ("alignloop.sample", "sample K completions per prompt for ranking"),
    "rank": ("alignloop.rank", "have the simulated labelers rank, rate, flag, correct and critique samples"),
    "reward": ("alignloop.train.reward", "step 2: train a reward model on K-way rankings or pairs"),
    "ppo": ("alignloop.train.ppo", "step 3: PPO against the reward model with a KL penalty (--algo rloo: RLOO)"),
    "dpo": ("alignloop.train.dpo", "DPO: the policy learns from the rankings directly (no reward model)"),
    "loop": ("alignloop.pipeline", "run rounds of sample → rank → reward → PPO"),
    "chat": ("alignloop.chat", "talk to a model in the terminal"),
    "label": ("alignloop.feedback", "serve the labeling web app"),
    "serve": ("alignloop.serve", "serve a chat page and an OpenAI-compatible API"),
    "report": ("alignloop.report", "write report.html for a run directory"),
}
# Stage commands that own a place in the run directory (rundir.stage_outputs) and are guarded there.
GUARDED = ("world", "tokenizer", "pretrain", "sft", "sample", "rank", "reward", "ppo", "dpo")
# Stage commands that run as many processes under torchrun (alignloop/dist.py), each rank doing its share
# (`run` walks the recipe on every rank: see pipeline.py).
DISTRIBUTED = ("run", "loop", "pretrain", "sft", "eval", "sample", "reward", "ppo", "dpo")
# Under torchrun these run on rank 0 alone while the others wait: cheap, and one file from all of the data.
# The commands in neither list (chat, label, serve, report) refuse torchrun.
MAIN_ONLY = ("world", "tokenizer", "rank")


def stage_parser(name: str, module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"alignloop {name}", description=COMMANDS[name][1])
    p.add_argument("--config", metavar="FILE.toml", help="a TOML file, flat or with a [%s] table" % module.SECTION)
    p.add_argument("--preset", choices=config.PRESETS, default=None, help="size preset (default: tiny)")
    p.add_argument("--out", metavar="RUN_DIR", default="runs/default", help="the run directory (default: runs/default)")
    if module.SECTION in GUARDED:
        p.add_argument("--force", action="store_true", help="write even over a stage made with another "
                       "configuration or one later stages were built on; the old output is moved aside, not deleted")
    if _resumable(module):
        p.add_argument("--restart", action="store_true", help="start over instead of resuming from the stage's "
                       "last checkpoint (the old folder is moved aside)")
    if hasattr(module, "add_arguments"):
        module.add_arguments(p)
    config.add_arguments(p, module.Config)
    return p


def _launched() -> bool:
    """Started by torchrun with several processes (read from its environment: no torch import here)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _resumable(module) -> bool:
    return any(f.name == "resume" for f in dataclasses.fields(module.Config))


def run_stage(name: str, argv: list[str]) -> None:
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "main") and not hasattr(module, "Config"):
        if _launched():  # a server, the terminal chat, the report: one process
            raise InputError(f"`alignloop {name}` does not run under torchrun: run it as one process")
        return module.main(argv)
    args = stage_parser(name, module).parse_args(argv)
    cfg = config.resolve(module.Config, module.SECTION, preset=args.preset or "tiny", presets=module.PRESETS,
                    toml=args.config, flags=config.flags_from_args(args, module.Config))
    out = Path(args.out)
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # every stage writes a folder there
        what = "a file" if blocked == out else f"{blocked} is a file"
        raise InputError(f"{what}, not a folder: --out names a run directory (new or existing)", file=out, field="--out")
    if hasattr(module, "check"):  # settings no bound expresses (DPO's β > 0): refused before anything moves
        module.check(cfg)
    on_main = lambda fn: fn()  # noqa: E731 (one process: the guard simply runs)
    if _launched():  # torchrun: join the process group first, so that rank 0 alone guards the run directory
        if name not in DISTRIBUTED + MAIN_ONLY:
            raise InputError(f"`alignloop {name}` does not run under torchrun: run it as one process "
                             f"(torchrun runs: {', '.join(DISTRIBUTED + MAIN_ONLY)})")
        from alignloop import dist
        dist.setup(cfg)
        on_main = dist.on_main
    if module.SECTION in GUARDED:
        if _resumable(module):  # on every rank: each loads the checkpoint
            cfg.resume = not getattr(args, "restart", False)
        on_main(lambda: _guard(name, module, cfg, out, args))

    def work():
        return module.run(cfg, out, args) if hasattr(module, "add_arguments") else module.run(cfg, out)
    result = on_main(work) if name in MAIN_ONLY else work()
    if _launched():  # the ranks leave together, once rank 0 has written everything
        dist.barrier()
        dist.close()
    return result


def _guard(name: str, module, cfg, out: Path, args) -> None:
    """Refuse to overwrite a stage (see rundir.guard_stage); resume by default where a checkpoint is."""
    from alignloop.rundir import guard_stage, stage_outputs
    restart = getattr(args, "restart", False)
    section = module.section(cfg) if hasattr(module, "section") else module.SECTION
    for old in guard_stage(out, section, cfg, force=args.force, restart=restart):
        print(f"{name}: moved the old {old.name.split('.old-')[0]} aside → {old}")
    if getattr(cfg, "resume", False):
        from alignloop.train.loop import Checkpoints
        latest = Checkpoints(stage_outputs(out, section, getattr(cfg, "round", None))[0]).latest()
        if latest is not None:
            print(f"{name}: resuming from {latest} (--restart to start over)")


def _leave() -> None:
    """A torchrun process whose stage ended (every rank past the last barrier, the process group destroyed)
    leaves at once, without the interpreter's teardown. There, about once in a hundred runs, a gloo worker
    thread still freeing the last collective's tensors asked for the interpreter lock while the interpreter
    was finalizing, was ended by it, and the process aborted (`terminate called without an active
    exception`, SIGABRT) after all its work was done and written; torchrun then reported the whole command
    failed (docs/LOG.md, 2026-12-01: the core dump's threads)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: alignloop <command> [options]   (alignloop <command> --help for each)\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name in ("--version", "-V"):
        from alignloop import __version__
        print(__version__)
        return
    if name not in COMMANDS:
        print(f"alignloop: unknown command {name!r}; run `alignloop --help`", file=sys.stderr)
        sys.exit(2)
    if name == "loop":
        rest = ["--loop-only", *rest]
    try:
        run_stage(name, rest)
        if _launched():
            _leave()
    except InputError as e:
        # Under torchrun every rank stops with the same error: rank 0 says it. Another rank waits first, as
        # its own exit would make torchrun kill rank 0 before it has printed (seen once under load); torchrun
        # ends the wait when rank 0 exits, and an error only this rank met is still said after it.
        if os.environ.get("RANK", "0") != "0":
            time.sleep(30)
        print(f"alignloop {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        module = importlib.import_module(COMMANDS[name][0])
        if name in ("run", "loop"):
            what = "finished steps are kept; run the same command again to continue"
        elif hasattr(module, "Config") and _resumable(module):
            what = "the last complete checkpoint is kept; run the same command again to resume from it"
        else:
            what = "this step keeps no checkpoint; run the same command again to start it over"
        print(f"\nalignloop {name}: interrupted; {what}", file=sys.stderr)
        sys.exit(130)
