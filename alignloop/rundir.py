"""The run directory: one self-describing folder per run (see docs/architecture.md, "Run directory")."""
from __future__ import annotations

import tomllib
from pathlib import Path

from alignloop import config as C
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
    sections[section] = C.to_toml({section: cfg})
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
    """Every finished policy of a run by name: base, sft, round-1/ppo, …, `ppo` for the newest, and
    models/<name> for a model brought into the run (a GGUF file is converted into RUN/models/<stem>)."""
    run_dir = Path(run_dir)
    found: dict[str, Path] = {}
    for name, sub in (("base", "pretrain"), ("sft", "sft")):
        if (run_dir / sub / "config.json").exists():
            found[name] = run_dir / sub
    for i in _rounds(run_dir):
        if (run_dir / f"round-{i}" / "ppo" / "config.json").exists():
            found[f"round-{i}/ppo"] = found["ppo"] = run_dir / f"round-{i}" / "ppo"
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
