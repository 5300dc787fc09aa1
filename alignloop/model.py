"""Models: a Llama-architecture causal LM from a size preset, or any Hugging Face causal LM; the
scalar-head model used for the reward and the value (`AutoModelForSequenceClassification` with one
label: it loads back with its head in any `transformers`); save/load as Hugging Face folders.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from alignloop import precision
from alignloop.errors import InputError
from alignloop.io import umask

hf_logging.disable_progress_bar()  # "Loading weights" bars would drown alignloop's own progress
hf_logging.set_verbosity_error()  # and its "newly initialized" notes: the loaders below check the weights
# themselves (`_check_weights`) and refuse a folder that does not fit, naming what it holds

# Size presets. `tiny` is sized to learn the embedded world in ~3 minutes on a 2-core CPU; `small` is
# GPT-2-small-like (~124M parameters with a 16k vocabulary it is ~100M) for one GPU.
SIZES = {
    "micro": dict(n_layer=2, n_head=4, d_model=64, ctx=256),
    "tiny": dict(n_layer=4, n_head=4, d_model=128, ctx=256),
    # ~4.3× tiny's parameters (5.8M with the world's vocabulary): the bigger SFT model that a small aligned
    # one should beat (InstructGPT's headline in miniature, experiments/bigger.py)
    "tiny4x": dict(n_layer=5, n_head=8, d_model=256, ctx=256),
    "small": dict(n_layer=12, n_head=12, d_model=768, ctx=1024),
}


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows rounded up: matmuls on a multiple of 64 are faster (nanoGPT's 50257 → 50304)."""
    return (n + multiple - 1) // multiple * multiple


def llama_config(size: str, vocab_size: int, tok, **overrides):
    from transformers import LlamaConfig
    if size not in SIZES:
        raise InputError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}", field="size")
    s = SIZES[size] | overrides
    return LlamaConfig(
        vocab_size=pad_vocab(vocab_size), hidden_size=s["d_model"], intermediate_size=4 * s["d_model"],
        num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"], num_key_value_heads=s["n_head"],
        max_position_embeddings=s["ctx"], rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tok.bos_id, eos_token_id=tok.end_id, pad_token_id=tok.pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_dropout=0.0, initializer_range=0.02,
    )


def create_causal_lm(size: str, tok, seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = llama_config(size, tok.vocab_size, tok, **overrides)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def check_model_dir(path: Path, field: str | None = None) -> None:
    """A Hugging Face model folder: a config and weights (a folder with only a config would otherwise load
    as a freshly initialised model on some code paths, or fail deep inside `transformers`)."""
    if not (path / "config.json").exists():
        raise InputError("not a Hugging Face model folder (no config.json)", file=path, field=field)
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "pytorch_model*.bin", "*.index.json")):
        raise InputError("the model folder has a config.json but no weights (*.safetensors or pytorch_model*.bin)",
                         file=path, field=field or "weights")


def load_causal_lm(path: str | Path, dtype=torch.float32):
    """A causal LM folder (a policy). A folder of another kind is refused (`InputError`), not loaded with a
    freshly initialised language-model head: a reward or value model (`*ForSequenceClassification` in its
    config.json), or any folder whose weights leave part of the causal LM missing or are not all used."""
    from transformers import AutoModelForCausalLM
    path = Path(path)
    check_model_dir(path)
    arch = _architectures(path)
    if any(a.endswith("ForSequenceClassification") for a in arch):
        raise InputError(f"this folder holds a reward or value model (config.json architectures: {', '.join(arch)}), "
                         "not a causal LM: it has no language-model head to generate with", file=path,
                         field="architectures")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa",
                                                           output_loading_info=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a causal LM: {e}", file=path) from None
    _check_weights(path, "a causal LM", arch, info)
    return model


def load_scalar_model(path: str | Path, dtype=torch.float32, trained: bool = False, likelihood_gate: bool = False):
    """A reward/value model folder, or a causal LM folder whose trunk gets a fresh (zero) scalar head — a
    training's start. `trained`: the folder must hold a trained scalar head (a reward model to score with);
    a causal LM folder is then refused (`InputError`) instead of scoring every answer 0 with a fresh head.
    Either way a folder whose weights leave the trunk missing, or are not all used, is refused.
    `likelihood_gate`: a fresh head gets a second output, the gate of `forward.last_scores` (config.json
    then says `likelihood_gate: true` and two labels; a folder that says so loads with both outputs)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    path = Path(path)
    check_model_dir(path)
    arch = _architectures(path)
    if trained and arch and not _is_scalar_dir(path):  # (no architectures: the weights below tell)
        raise InputError(f"this folder holds {', '.join(arch)} (config.json architectures), not a reward model: it "
                         "has no trained score head (a reward model is what `alignloop reward` writes)", file=path,
                         field="architectures")
    cfg = AutoConfig.from_pretrained(str(path))
    fresh = not trained and not _is_scalar_dir(path)
    if likelihood_gate and not fresh and not getattr(cfg, "likelihood_gate", False):
        raise InputError("--likelihood-gate gives a fresh score head a second output; this folder already holds a "
                         "reward model without one: start from a causal LM (the SFT model) instead", file=path,
                         field="likelihood_gate")
    if fresh and likelihood_gate:
        if not getattr(cfg, "tie_word_embeddings", False):
            raise InputError("--likelihood-gate reads each token's log-probability through the LM head, which a "
                             "reward model keeps only as tied input embeddings: this model's are untied",
                             file=path, field="tie_word_embeddings")
        cfg.likelihood_gate = True
    cfg.num_labels = 2 if getattr(cfg, "likelihood_gate", False) else 1
    if cfg.pad_token_id is None:
        cfg.pad_token_id = cfg.eos_token_id
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), config=cfg, dtype=dtype, attn_implementation="sdpa", output_loading_info=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a scalar-head model: {e}", file=path) from None
    # a training's start from a causal LM: its score head is the one weight expected missing, its LM head unused
    _check_weights(path, "a reward model" if trained else "a scalar-head model", arch, info,
                   missing_ok=("score.",) if fresh else (), unexpected_ok=("lm_head.",) if fresh else ())
    if fresh:  # a fresh head: start every score (and the gate) at 0 so early training is stable
        torch.nn.init.zeros_(model.score.weight)
    return model


def load_reward_model(path: str | Path, dtype=torch.float32):
    """A trained reward model to score with (`load_scalar_model(trained=True)`)."""
    return load_scalar_model(path, dtype, trained=True)


def _architectures(path: Path) -> list[str]:
    try:
        arch = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (ValueError, AttributeError):
        raise InputError("config.json is not a JSON object", file=path / "config.json") from None
    return [str(a) for a in arch] if isinstance(arch, list) else []


def _check_weights(path: Path, what: str, arch: list[str], info: dict, missing_ok=(), unexpected_ok=()) -> None:
    """Refuse a folder whose weights do not fit the model built from it: `transformers` would initialise the
    missing ones at random (e.g. the LM head of a reward model's folder with an untied head) and drop the
    unexpected ones, and say so only in a warning this module silences."""
    def names(keys, ok):
        return sorted(k for k in keys or () if not k.startswith(ok))
    missing, unexpected = names(info.get("missing_keys"), missing_ok), names(info.get("unexpected_keys"), unexpected_ok)
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    found = [f"{label} {_few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                          ("of another shape", mismatched)) if keys]
    fate = " and ".join(x for x, keys in (("start some weights at random", missing or mismatched),
                                           ("drop some of its weights", unexpected)) if keys)
    raise InputError(f"its weights do not fit {what} ({'; '.join(found)}; config.json architectures: "
                     f"{', '.join(arch) or 'none'}): loading it as {what} would {fate}", file=path, field="weights")


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _is_scalar_dir(path: Path) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in _architectures(path))


def save_model(model, tok, path: str | Path, extra_files: dict[str, str] | None = None) -> None:
    """Write a Hugging Face folder (safetensors + tokenizer with chat template) into `path`.

    The stage folder also holds metrics.jsonl and checkpoints/, so the model files are written into a
    temporary folder and each is renamed into place (every file whole); config.json goes last, and a
    folder counts as a model only once it has one.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".saving-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.chmod(f, (0o666 if f.is_file() else 0o777) & ~umask())  # safetensors writes 0600; run files are shared
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def n_params(model, non_embedding: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention (PaLM appendix B / nanoGPT)."""
    c = model.config
    # With tied embeddings the output head is a real matmul, so every parameter counts.
    return 6 * n_params(model, non_embedding=False) + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)", field="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", field="device")
    if device.type == "cuda":
        # cuDNN's attention backward (the default SDPA backend on Hopper since torch 2.11) returns NaN
        # gradients when an explicit mask is passed, the length is 64 mod 128 and a row attends to nothing
        # (our left padding): on an H200 it turned PPO's policy to NaN at iteration 8 of the main job. The
        # memory-efficient kernel, next in line, is exact there (pytorch/pytorch#196678).
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config.DTYPES


def pick_dtype(name: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """auto: bfloat16 on a GPU (half the memory, tensor cores, fp32's range); float32 on the CPU, where
    bfloat16 matmuls are slower on most chips and rounding would change answers for nothing."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r} (auto, {', '.join(DTYPES)})", field="dtype")
    if name == "bfloat16":
        precision.amp_dtype(torch.device(device), name)  # for its warning where the CPU has no bf16 instructions
    return DTYPES[name]


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model on its device in its dtype, the device): what chat, serve, eval and the samplers load."""
    dev = pick_device(device)
    return load_causal_lm(path, pick_dtype(dtype, dev)).to(dev), dev
