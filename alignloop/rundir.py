"""The run directory: one self-describing folder per run (see docs/architecture.md, "Run directory")."""
from __future__ import annotations

import dataclasses
import shutil
import time
import tomllib
from pathlib import Path

from alignloop import config
from alignloop.errors import InputError
from alignloop.io import atomic_write_text


def save_stage_config(run_dir: Path, section: str, cfg) -> None:
    """Merge this stage's resolved config into RUN/config.toml (the full resolved configuration)."""
    path = Path(run_dir) / "config.toml"
    sections: dict[str, str] = {}
    if path.exists():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for name in data:
            if isinstance(data[name], dict):
                sections[name] = _table(name, data[name])
    sections[section] = config.to_toml({section: cfg})
    atomic_write_text(path, "\n".join(sections[k].rstrip() + "\n" for k in sections))


def _table(name: str, table: dict) -> str:
    lines = [f"[{name}]"]
    for k, v in table.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f'{k} = "' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "\n".join(lines) + "\n"


def resolve_path(value: str | None, run_dir: Path, default: str) -> Path:
    """A config path: given explicitly (relative to the working directory) or the run's default."""
    return Path(value) if value else Path(run_dir) / default


def _rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.name[6:]) for p in Path(run_dir).glob("round-*") if p.name[6:].isdigit())


def stage_models(run_dir: Path) -> dict[str, Path]:
    """Every finished policy of a run by name: base, sft, round-1/ppo, …, `ppo` for the newest (the same for
    the other methods' round-i/dpo and round-i/rloo, and `dpo`, `rloo`), and models/<name> for a model brought into the run
    (a GGUF file is converted into RUN/models/<stem>)."""
    run_dir = Path(run_dir)
    found: dict[str, Path] = {}
    for name, sub in (("base", "pretrain"), ("sft", "sft")):
        if (run_dir / sub / "config.json").exists():
            found[name] = run_dir / sub
    for i in _rounds(run_dir):
        for method in ("ppo", *SIDE):  # `ppo` (`dpo`, `rloo`) also names the newest round's
            if (run_dir / f"round-{i}" / method / "config.json").exists():
                found[f"round-{i}/{method}"] = found[method] = run_dir / f"round-{i}" / method
    for cfg in sorted(run_dir.glob("models/*/config.json")):
        found[f"models/{cfg.parent.name}"] = cfg.parent
    return found


def current_policy(run_dir: Path) -> Path | None:
    """The newest policy of a run: the last round's PPO, else SFT, else the base model."""
    models = stage_models(run_dir)
    for name in ("ppo", "sft", "base"):
        if name in models:
            return models[name]
    return None


def round_dir(run_dir: Path, i: int) -> Path:
    return Path(run_dir) / f"round-{i}"


# ---------------------------------------------------------------- the stage guard
#
# A stage command writes into one place of a run (RUN/sft/, RUN/round-2/reward/, …). Writing over a
# stage trained with another configuration, or one that later stages were built on, would leave the
# run describing models it no longer holds; so a stage command refuses that (exit 2) unless --force,
# which moves the old output aside (never deletes it).

PRE_ROUND = ("world", "tokenizer", "pretrain", "sft")
IN_ROUND = ("sample", "rank", "reward", "ppo")
# Stages beside the recipe's chain, each built on one stage of its round and nothing built on them (the next
# round samples from PPO's policy): DPO learns from the rankings, RLOO (`ppo --algo rloo`) from the reward model.
SIDE = {"dpo": "rank", "rloo": "reward"}
# Fields that may differ between two calls writing the same folder without changing what it holds (a run
# started with DDP may resume with FSDP2: checkpoints hold full state dicts either way).
NOT_COMPARED = {"resume", "round", "device", "compile", "stage", "model", "fsdp", "dist_backend"}


def stage_outputs(run_dir: Path, section: str, round_: int | None = None) -> list[Path]:
    """What a stage writes (folders or files); empty for commands that do not own a stage folder."""
    run_dir = Path(run_dir)
    if section in PRE_ROUND:
        return [run_dir / section]
    if section not in IN_ROUND and section not in SIDE:
        return []
    folder = round_dir(run_dir, round_ or 1)
    if section == "sample":
        return [folder / "samples.jsonl"]
    if section == "rank":
        return [folder / n for n in ("rankings.jsonl", "demonstrations.jsonl", "pairs.jsonl")]
    return [folder / section]


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def later_outputs(run_dir: Path, section: str, round_: int | None = None) -> list[Path]:
    """Existing outputs of the stages that come after `section` (in its round, or in later rounds)."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    if section in PRE_ROUND:
        for later in PRE_ROUND[PRE_ROUND.index(section) + 1:]:
            found += [p for p in stage_outputs(run_dir, later) if _exists(p)]
        first_round = 0
    elif section in IN_ROUND:
        i = round_ or 1
        for later in IN_ROUND[IN_ROUND.index(section) + 1:]:
            found += [p for p in stage_outputs(run_dir, later, i) if _exists(p)]
        if IN_ROUND.index(section) < IN_ROUND.index("reward"):  # people's rankings count as a later stage
            found += sorted(round_dir(run_dir, i).glob("human-rankings-*.jsonl"))
        for side, parent in SIDE.items():  # DPO is built on the rankings, RLOO on the reward model
            if IN_ROUND.index(section) <= IN_ROUND.index(parent):
                found += [p for p in stage_outputs(run_dir, side, i) if _exists(p)]
        first_round = i
    else:  # nothing is built on a side stage (dpo, rloo)
        return []
    for j in _rounds(run_dir):
        if j > first_round:
            found += [p for s in (*IN_ROUND, *SIDE) for p in stage_outputs(run_dir, s, j) if _exists(p)]
    return found


def config_difference(run_dir: Path, section: str, cfg) -> tuple[str, str] | None:
    """(field, "field = saved there, now now") when RUN/config.toml's [section] differs from cfg, else None."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        return None
    saved = tomllib.loads(path.read_text(encoding="utf-8")).get(section) or {}
    for f in dataclasses.fields(cfg):
        if f.name in NOT_COMPARED or f.name not in saved:
            continue
        now = getattr(cfg, f.name)
        same = saved[f.name] == now or (isinstance(now, float) and abs(saved[f.name] - now) < 1e-12)
        if now is not None and not same:
            return f.name, f"{f.name} = {saved[f.name]!r} there, {now!r} now"
    return None


def guard_stage(run_dir: Path, section: str, cfg, force: bool = False, restart: bool = False) -> list[Path]:
    """Refuse (InputError) to write into a stage trained with another configuration, or one that later
    stages exist for, unless `force`; with `force` (or `restart`) move the old output aside. Returns the
    paths it moved aside."""
    run_dir = Path(run_dir)
    outputs = [p for p in stage_outputs(run_dir, section, getattr(cfg, "round", None)) if _exists(p)]
    if not outputs:
        return []
    where = outputs[0]
    later = later_outputs(run_dir, section, getattr(cfg, "round", None))
    diff = config_difference(run_dir, section, cfg)
    if not force:
        if later:
            raise InputError(f"later stages were built on it ({later[0].relative_to(run_dir)}"
                             f"{f' and {len(later) - 1} more' if len(later) > 1 else ''}); use a new --out, "
                             f"or --force to move the old {section} aside", file=where)
        if diff:
            raise InputError(f"it was made with another configuration ([{section}] {diff[1]}); use a new --out, "
                             f"the same settings, or --force to move the old {section} aside", file=where,
                             field=diff[0])
        if not restart:
            return []
    return move_aside(run_dir, outputs)


def move_aside(run_dir: Path, paths: list[Path]) -> list[Path]:
    """Rename each path to `<name>.old-<UTC time>` beside it (with a copy of config.toml inside a folder)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for p in paths:
        dest = p.with_name(f"{p.name}.old-{stamp}")
        n = 2
        while dest.exists():
            dest, n = p.with_name(f"{p.name}.old-{stamp}-{n}"), n + 1
        p.rename(dest)
        if dest.is_dir() and (Path(run_dir) / "config.toml").exists():
            shutil.copy2(Path(run_dir) / "config.toml", dest / "run-config.toml")
        moved.append(dest)
    return moved


def versioned_path(folder: Path, stem: str, suffix: str = ".jsonl") -> Path:
    """A new file `folder/<stem>-<UTC time><suffix>` (a counter is added when that name is taken; order
    them with `by_version`). The name is reserved by creating the file exclusively, so two exports at
    once never share one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp, n = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), 1
    while True:
        path = folder / f"{stem}-{stamp}{'' if n == 1 else f'-{n}'}{suffix}"
        try:
            open(path, "x").close()
            return path
        except FileExistsError:
            n += 1


def by_version(paths) -> list[Path]:
    """Files of `versioned_path` oldest first: by their time, then counter (as text, "-2" would sort
    after "" and "-10" before "-2"); a name without a time (an older run's chat-pairs.jsonl) first."""
    import re

    def key(p: Path):
        m = re.search(r"-(\d{8}T\d{6}Z)(?:-(\d+))?$", Path(p).name.split(".")[0])
        return (1, m.group(1), int(m.group(2) or 1)) if m else (0, "", 0)
    return sorted(map(Path, paths), key=key)
