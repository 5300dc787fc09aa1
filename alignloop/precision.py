"""Training precision in one place: `amp_dtype` decides it, `autocast` applies it to a stage's forward
passes, and FSDP2's mixed precision (`dist.wrap`) follows the same decision."""
from __future__ import annotations

import contextlib

import torch


def amp_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The one precision policy of training: bf16 on a GPU, fp32 (None) on the CPU by default. A CPU's bf16
    speed depends on the chip: without bf16 instructions its matmuls are many times slower, with
    avx512_bf16 (this project's AMD EPYC) about 2x faster, so `--dtype bfloat16` is a measured choice
    there (a SmolLM2 PPO iteration 64 s → 40 s, docs/benchmarks.md), not the default. Both autocast and
    FSDP2's mixed precision (dist.wrap) follow it."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return None if dtype == "float32" else getattr(torch, dtype)


def autocast(device: torch.device, dtype: str):
    """Autocast to `amp_dtype`, or nothing in fp32."""
    half = amp_dtype(device, dtype)
    return contextlib.nullcontext() if half is None else torch.autocast(device.type, dtype=half)
