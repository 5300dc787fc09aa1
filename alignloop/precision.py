"""Training precision in one place: `amp_dtype` decides it, `autocast` applies it to a stage's forward
passes, and FSDP2's mixed precision (`dist.wrap`) follows the same decision."""
from __future__ import annotations

import contextlib
import functools
import sys

import torch


def amp_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The one precision policy of training: bf16 on a GPU, fp32 (None) on the CPU by default. A CPU's bf16
    speed depends on the chip: without bf16 instructions its matmuls are many times slower, with
    avx512_bf16 (this project's AMD EPYC) about 2x faster, so `--dtype bfloat16` is a measured choice
    there (a SmolLM2 PPO iteration 64 s → 40 s, docs/benchmarks.md), not the default. Both autocast and
    FSDP2's mixed precision (dist.wrap) follow it."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        _warn_slow_cpu_bf16()
    return None if dtype == "float32" else getattr(torch, dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (avx512_bf16 or AMX). Without either, torch
    converts to fp32 and back around every product: on an Intel Xeon without them (2026-12-06) a bf16
    matmul ran at 21 GFLOP/s against fp32's 124, one thread."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    # said once a process, not on every autocast; a choice the user made, so a warning, not an error
    print("alignloop: warning: --dtype bfloat16 on a CPU without bf16 instructions (no avx512_bf16, no AMX): "
          "its matrix products run several times slower than in fp32 here; --dtype float32 is faster",
          file=sys.stderr, flush=True)


def autocast(device: torch.device, dtype: str):
    """Autocast to `amp_dtype`, or nothing in fp32."""
    half = amp_dtype(device, dtype)
    return contextlib.nullcontext() if half is None else torch.autocast(device.type, dtype=half)
