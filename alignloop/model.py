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

from alignloop.errors import InputError

hf_logging.disable_progress_bar()  # "Loading weights" bars would drown alignloop's own progress
hf_logging.set_verbosity_error()  # and its "newly initialized" notes are expected for a fresh scalar head

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
    from transformers import AutoModelForCausalLM
    path = Path(path)
    check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a causal LM: {e}", file=path) from None


def load_scalar_model(path: str | Path, dtype=torch.float32):
    """A reward/value model folder, or a causal LM folder whose trunk gets a fresh (zero) scalar head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    path = Path(path)
    check_model_dir(path)
    cfg = AutoConfig.from_pretrained(str(path))
    cfg.num_labels = 1
    if cfg.pad_token_id is None:
        cfg.pad_token_id = cfg.eos_token_id
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), config=cfg, dtype=dtype,
                                                                   attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a scalar-head model: {e}", file=path) from None
    if not _is_scalar_dir(path):  # a fresh head: start every score at 0 so early training is stable
        torch.nn.init.zeros_(model.score.weight)
    return model


def _is_scalar_dir(path: Path) -> bool:
    arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in arch)


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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)", field="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", field="device")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config.DTYPES


def pick_dtype(name: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """auto: bfloat16 on a GPU (half the memory, tensor cores, fp32's range); float32 on the CPU, where
    bfloat16 matmuls are slower on most chips and rounding would change answers for nothing."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r} (auto, {', '.join(DTYPES)})", field="dtype")
    return DTYPES[name]


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model on its device in its dtype, the device): what chat, serve, eval and the samplers load."""
    dev = pick_device(device)
    return load_causal_lm(path, pick_dtype(dtype, dev)).to(dev), dev
