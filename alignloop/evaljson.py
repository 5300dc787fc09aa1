"""eval.json: the run's results, read and updated in one place.

RUN/eval.json (its shape: docs/formats.md, "eval.json") holds `stages` (each evaluated policy on the test
prompts), `stages_<split>` beside it for a tuning split, `reward_model` (each round's reward model on its
held-out comparisons) and `fact_recall`. A stage that evaluates itself as it trains (the reward model, DPO)
writes its own STAGE/eval.json, which the main job copies under `reward_model`. Torch-free.
"""
from __future__ import annotations

import json
from pathlib import Path

from alignloop.errors import InputError
from alignloop.io import write_json

NAME = "eval.json"


def key_of(split: str) -> str:
    """Where a split's results live in eval.json: test under "stages" (what is reported), any other split
    beside it ("stages_dev"), so a tuning run never overwrites a test figure, nor passes for one."""
    return "stages" if split == "test" else f"stages_{split}"


def read(run_dir: Path) -> dict:
    """RUN/eval.json ({} before anything was evaluated). Not JSON, or not an object whose `stages` is an
    object: an InputError naming the file."""
    path = Path(run_dir) / NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("stages") or {}, dict):
        raise InputError("expected an object whose `stages` is an object", file=path, field="stages")
    return data


def update(run_dir: Path, name: str, result: dict, key: str = "stages") -> None:
    """Set `name`'s entry under `key` ("stages", "stages_dev", "reward_model") to `result`."""
    data = read(run_dir)
    data.setdefault("stages", {})
    data.setdefault("reward_model", {})
    data.setdefault(key, {})[name] = result
    write_json(Path(run_dir) / NAME, data)


def put(run_dir: Path, field: str, value) -> None:
    """Set a top-level field (`fact_recall`)."""
    data = read(run_dir)
    data[field] = value
    data.setdefault("stages", {})
    data.setdefault("reward_model", {})
    write_json(Path(run_dir) / NAME, data)


def write_stage(stage_dir: Path, result: dict) -> None:
    """A training stage's own STAGE/eval.json."""
    write_json(Path(stage_dir) / NAME, result)


def read_stage(stage_dir: Path) -> dict:
    """A training stage's own STAGE/eval.json (ValueError when it is not JSON, or not UTF-8)."""
    return json.loads((Path(stage_dir) / NAME).read_text(encoding="utf-8"))
