"""One flat configuration dataclass per stage.

Every field is declared with `option(default, doc, ...)`; its doc becomes the `--help` text of the flag.
A value is resolved in this order, later winning:  dataclass default ← size preset ← TOML file ← flag.
The TOML file may be flat (`lr = 3e-4`) or hold one table per stage (`[pretrain] lr = 3e-4`), which is
how `runs/<name>/config.toml` is written, so a run's config can be fed back to any stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from pathlib import Path

from alignloop.errors import InputError

PRESETS = ("micro", "tiny", "small")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on CUDA, float32 on the CPU (model.pick_dtype)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` for the commands that are not config stages (chat, serve, label). Kept
    here, not in model.py, so that parsing them does not import torch (the labeling app starts without it)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the weights' type in memory: auto = bfloat16 on CUDA, float32 on the CPU")


def option(default, doc: str, *, min=None, max=None, choices=None):
    """A config field: default value, one-line doc, optional numeric bounds or allowed values."""
    return dataclasses.field(default=default, metadata={"doc": doc, "min": min, "max": max, "choices": choices})


@dataclasses.dataclass
class Shared:
    """The fields every training stage declares the same way, written once; a stage's `Config` inherits
    them (they come first in its flags and its `config.toml` table)."""
    seed: int = option(0, "seed of the stage's randomness: initialisation, data order, held-out split")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16", choices=("auto", "float32", "bfloat16"))
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and optimizer state over the processes "
                        "(FSDP2) instead of a full copy in each (DDP)")
    dist_backend: str = option("auto", "under torchrun: auto (nccl on CUDA, gloo on the CPU), gloo or nccl",
                               choices=("auto", "gloo", "nccl"))


@dataclasses.dataclass
class Resumable(Shared):
    """A stage that checkpoints: `--restart` is offered for it (cli) and it resumes by default."""
    resume: bool = option(False, "continue from the last checkpoint in the stage folder")


@dataclasses.dataclass
class LowRank:
    """Training less than a whole model: the fields of the stages that fine-tune one (reward, DPO, PPO),
    written once. A stage whose adapters mean more (PPO's reference and value model) redeclares the doc."""
    lora_rank: int = option(0, "LoRA adapters of this rank on every linear layer instead of full weights (0: off); "
                            "saved merged", min=0)
    lora_alpha: float = option(16.0, "LoRA scale α (the update is scaled by α / rank)", min=0.0)
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, ~30% slower)")


@dataclasses.dataclass
class Preferences(LowRank, Shared):
    """The stages that learn from rankings and pairs (`reward`, `dpo`): where the feedback comes from, the
    model they start from, and how they train, written once. A stage changes a default by redeclaring the
    field (DPO: fewer epochs, a smaller learning rate)."""
    round: int = option(1, "round number: output goes to RUN/round-<round>/<stage>/; the feedback of rounds "
                        "1..round is read", min=1)
    data: str = option("", "rankings or pairs files, comma-separated (default: those of --sources in rounds 1..round)")
    sources: str = option("simulated,label", "feedback to learn from, comma-separated: simulated (alignloop rank), "
                          "label (the labeling app), chat (thumbs), arena (votes); records of other sources are left out")
    min_agreement: float = option(0.0, "leave out items whose labelers agree on less than this share of pairs "
                                  "(items ranked by one labeler are kept; 0: keep all)", min=0.0, max=1.0)
    skip_invalid: bool = option(False, "leave out malformed rankings or pairs (counted, the first named) instead of stopping")
    init: str = option("", "model to start from: a Hugging Face folder or a .gguf file (default: the run's sft/)")
    epochs: int = option(2, "passes over the comparisons (InstructGPT's reward model: 1; it over-fits after)", min=1)
    batch_size: int = option(16, "prompts per step, all pairs of each (pairs per step with reward's --no-grouped)", min=1)
    lr: float = option(2e-4, "peak learning rate", min=0.0, max=1.0)
    warmup_steps: int = option(10, "linear warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", min=0.0)
    max_len: int = option(256, "longest prompt + answer in tokens; longer ones are left out (counted)", min=8)
    val_fraction: float = option(0.1, "prompts held out when the data marks no held-out split", min=0.0, max=0.5)
    early_stop: float = option(0.0, "hold out this share of the training prompts; after every epoch score them and keep "
                               "the epoch whose held-out loss is lowest (0: off, keep the last)", min=0.0, max=0.5)


def _field_type(cls, f) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint  # `str | None` -> str


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--flag` per field; defaults are SUPPRESSed so we can tell a given flag from an absent one."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(cls, f)
        doc = f.metadata.get("doc", "")
        help_text = f"{doc} (default: {f.default!r})".replace("%", "%%")  # argparse %-formats help
        if t is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=str, default=argparse.SUPPRESS,
                               metavar=t.__name__.upper(), help=help_text)


def _coerce(cls, f, value, source):
    t = _field_type(cls, f)
    if value is None:
        return None
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if t is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int flag of "1e999"
        raise InputError(f"expected {t.__name__}, got {value!r}", file=source, field=f.name) from None


def _allowed(min=None, max=None) -> str:
    if min is not None and max is not None:
        return f"{min} to {max}"
    if min is not None:
        return f"{min} or more"
    if max is not None:
        return f"{max} or less"
    return "any finite number"


def check_number(value, field: str, *, min=None, max=None, file=None) -> None:
    """The one check of a number given by the user (a config field, or a flag of chat, serve, label):
    NaN and ±infinity are refused (no option means them: a NaN passes every `<` test and would train or
    sample garbage), then the bounds, each with what is allowed."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{value} is not a finite number (allowed: {_allowed(min, max)})", file=file, field=field)
    if min is not None and value < min:
        raise InputError(f"{value} is below the minimum {min} (allowed: {_allowed(min, max)})", file=file, field=field)
    if max is not None and value > max:
        raise InputError(f"{value} is above the maximum {max} (allowed: {_allowed(min, max)})", file=file, field=field)


def _check_range(f, value, source):
    m = f.metadata
    if value is None:
        return
    if m.get("choices") is not None and value not in m["choices"]:
        allowed = ", ".join(str(c) if c != "" else '"" (none)' for c in m["choices"])
        raise InputError(f"{value!r} is not one of {allowed}", file=source, field=f.name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_number(value, f.name, min=m.get("min"), max=m.get("max"), file=source)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", file=path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError("config file is not UTF-8 text", file=path) from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"not valid TOML: {e}", file=path) from None


def resolve(cls, section: str, *, preset: str | None = None, presets: dict | None = None,
            toml: str | Path | None = None, flags: dict | None = None):
    """Build `cls` from defaults, then the preset, then the TOML file (flat or `[section]`), then flags."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    layers: list[tuple[dict, str]] = []
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", field="preset")
        layers.append(((presets or {}).get(preset, {}), f"preset {preset}"))
    if toml is not None:
        data = load_toml(toml)
        table = data.get(section, None)
        if isinstance(table, dict):
            layers.append((table, f"{toml} [{section}]"))
        else:  # a flat file: keep only the scalar keys; other tables belong to other stages
            flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
            unknown = [k for k in flat if k not in names]
            if unknown:
                raise InputError(f"unknown option for {section}", file=toml, field=unknown[0])
            layers.append((flat, str(toml)))
    if flags:
        layers.append((flags, "command line"))
    values = {}
    for layer, source in layers:
        for k, v in layer.items():
            if k not in names:
                raise InputError(f"unknown option for {section}", file=source, field=k)
            values[k] = _coerce(cls, names[k], v, source)
            _check_range(names[k], values[k], source)
    obj = cls(**values)
    for f in dataclasses.fields(cls):  # defaults must obey the bounds too
        _check_range(f, getattr(obj, f.name), "defaults")
    return obj


def flags_from_args(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def to_toml(sections: dict[str, object]) -> str:
    """Render {section: dataclass} as TOML (None values are left out: TOML has no null)."""
    lines = []
    for name, cfg in sections.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if v is None:
                continue
            if isinstance(v, bool):
                s = "true" if v else "false"
            elif isinstance(v, (int, float)):
                s = repr(v)
            else:
                s = '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{f.name} = {s}")
        lines.append("")
    return "\n".join(lines)
