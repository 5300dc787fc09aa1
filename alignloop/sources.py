"""Where a model comes from: a Hugging Face folder or a GGUF file, and which tokenizer folder it uses.

    resolve_model(path, run_dir)   a model folder, or a .gguf converted once into one → the folder
    tokenizer_dir(model_dir, run)  the model folder if it holds a tokenizer, else the run's tokenizer/

A `.gguf` file (what llama.cpp and Ollama users have) is dequantised by `transformers` and written ONCE
as an ordinary Hugging Face folder — safetensors, config, generation_config, tokenizer with its chat
template — so every later stage, server and outside tool reads a normal folder:
- in a run (`run_dir` given): RUN/models/<stem>/, beside the run's other models;
- else in the cache: $ALIGNLOOP_CACHE/models/<stem>-<hash> (default ~/.cache/alignloop), the hash
  taken over the file's name, size and modification time, so a changed file converts again.
The folder records its source in `source.json`; a later call with the same file reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from alignloop.errors import InputError
from alignloop.model import check_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a vocabulary, not only a config


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNLOOP_CACHE") or Path.home() / ".cache" / "alignloop")


def resolve_model(path: str | Path, run_dir: str | Path | None = None, field: str | None = None) -> Path:
    """A Hugging Face model folder (checked: config and weights), or the folder a `.gguf` converts to.
    `field` names the flag the path came from in error messages."""
    path = Path(path)
    if path.is_dir():
        check_model_dir(path, field)
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return from_gguf(path, run_dir, field)
    if not path.exists():
        raise InputError("no such model folder or .gguf file", file=path, field=field)
    raise InputError("neither a Hugging Face model folder nor a .gguf file", file=path, field=field)


def tokenizer_dir(model_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """THE rule for a model's tokenizer: its own folder when it holds one (a foreign model, or a stage
    saved by alignloop), else its run's tokenizer/ — `run_dir`, or the run the folder sits in
    (RUN/sft, RUN/round-2/ppo)."""
    model_dir = Path(model_dir)
    if any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return model_dir
    runs = [Path(run_dir)] if run_dir is not None else list(model_dir.resolve().parents)[:2]
    for run in runs:
        if (run / "tokenizer").is_dir():
            return run / "tokenizer"
    raise InputError(f"the model folder holds no tokenizer ({', '.join(TOKENIZER_FILES)}) and no run "
                     "tokenizer/ was found beside it", file=model_dir, field="tokenizer")


# ---------------------------------------------------------------- GGUF


def _source(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "name": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def gguf_dest(gguf: Path, run_dir: str | Path | None) -> Path:
    """Where a GGUF file's Hugging Face folder lives (see the module docstring)."""
    if run_dir is not None:
        return Path(run_dir) / "models" / gguf.stem
    s = _source(gguf)
    key = hashlib.sha256(f"{s['name']}|{s['size']}|{s['mtime_ns']}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _same_source(dest: Path, gguf: Path) -> bool:
    try:
        old = json.loads((dest / "source.json").read_text())
    except (OSError, ValueError):
        return False
    new = _source(gguf)
    return all(old.get(k) == new[k] for k in ("name", "size", "mtime_ns"))


def from_gguf(gguf: Path, run_dir: str | Path | None = None, field: str | None = None) -> Path:
    """The Hugging Face folder of a GGUF file: the one converted before from this very file, else a new one."""
    from alignloop.io import atomic_dir
    dest = gguf_dest(gguf, run_dir)
    if _same_source(dest, gguf):
        return dest
    if (dest / "config.json").exists() and not (dest / "source.json").exists():
        raise InputError(f"{dest} already holds a model that was not converted from this file; move it away "
                         "or name another run", file=gguf, field=field)
    t0 = time.time()
    model, tok = load_gguf(gguf, field)  # everything that can fail on a bad file fails here, before writing
    # NOTE: written in the dtype the weights were dequantised to (float32): no rounding on the way, and
    # `--dtype` picks what a stage computes in when it loads the folder.
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "source.json").write_text(json.dumps(_source(gguf), indent=2) + "\n")
        for f in tmp.iterdir():  # safetensors writes 0600; a run's (and the cache's) files are meant to be shared
            os.chmod(f, 0o644)
    mb = gguf.stat().st_size / 1e6
    print(f"converted {gguf} ({mb:.1f} MB, {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) → {dest} in {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return dest


def load_gguf(gguf: Path, field: str | None = None):
    """(model, Hugging Face tokenizer) dequantised from a GGUF file, or an InputError saying why not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    folder, name = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Unpacked into plain float32 tensors: transformers would otherwise keep quantised blocks behind
        # GGUF-only kernels where it has them, and such a model cannot be saved or trained.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as e:  # a bad file surfaces as ValueError, struct.error, IndexError… from deep inside
        raise explain_gguf_error(gguf, e, field) from None
    if getattr(model, "hf_quantizer", None) is not None:
        # Every weight is dense now; what is left is the note "quantised with gguf", which makes
        # save_pretrained refuse and would be written into config.json.
        model.hf_quantizer.remove_quantization_config(model)
    return model, tok


def explain_gguf_error(gguf: Path, err: Exception, field: str | None = None) -> InputError:
    """Turn a failed GGUF load into one message naming the file and the part of it at fault: the
    magic bytes, the metadata or tensor data (truncated or damaged), or the architecture."""
    import gguf as gg
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            return InputError("not a GGUF file (it does not start with the bytes 'GGUF')", file=gguf, field="magic")
    size = gguf.stat().st_size
    try:
        reader = gg.GGUFReader(str(gguf))
    except Exception as e:  # llama.cpp's own reader: it builds the metadata, then maps every tensor
        # Which of the two it was reading tells the user whether the header or the data was cut.
        in_data = any(fr.name == "_build_tensors" for fr in traceback.extract_tb(e.__traceback__))
        return InputError(f"truncated or damaged GGUF file ({size:,} bytes; {type(e).__name__}: {e}) — "
                          "an interrupted download? fetch it again", file=gguf,
                          field="tensor data" if in_data else "metadata")
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch is None:
        return InputError("the GGUF metadata names no architecture", file=gguf, field="general.architecture")
    if "not supported" in str(err) or "architecture" in str(err):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are not models
        return InputError(f"transformers cannot load the GGUF architecture {arch!r} (it loads: {', '.join(known)})",
                          file=gguf, field="general.architecture")
    return InputError(f"transformers cannot load this {arch} GGUF file: {type(err).__name__}: {err}",
                      file=gguf, field=field)
