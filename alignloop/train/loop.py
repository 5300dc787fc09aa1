"""What every training stage does the same way: optimizer, schedule, batching order, checkpoint files,
metrics log and progress, LoRA and memory. Each stage's own file keeps its loop visible; this file only
holds the pieces so that they are written once. Beside it: the precision policy (alignloop/precision.py),
what a checkpoint holds of a model under any number of processes (alignloop/dist.py) and the data helpers
the stages share (train/data.py).
"""
from __future__ import annotations

import math
import os
import re
import time
import warnings
from pathlib import Path

import torch

from alignloop.io import append_jsonl, read_jsonl_tolerant


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW; no decay on biases, norms and embeddings' 1-D params (nanoGPT); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to lr·min_ratio at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class RowSampler:
    """Deterministic batches: the rows of micro-batch k depend only on (seed, k), so a resumed run
    draws exactly the batches an uninterrupted one would (a fresh permutation each epoch)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.b, self.seed, self._perms = n_rows, batch_size, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, k: int) -> torch.Tensor:
        flat = torch.arange(k * self.b, (k + 1) * self.b)
        return torch.stack([self._perm(int(i) // self.n)[int(i) % self.n] for i in flat])


# ---------------------------------------------------------------- checkpoints


class Checkpoints:
    """`stage_dir/checkpoints/step-000123.pt`, each written whole (temp file + rename); keeps the last k."""

    def __init__(self, stage_dir: Path, keep: int = 2):
        self.dir, self.keep = Path(stage_dir) / "checkpoints", keep

    def latest(self) -> Path | None:
        found = sorted(self.dir.glob("step-*.pt")) if self.dir.exists() else []
        return found[-1] if found else None

    def save(self, step: int, **state) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:06d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"step": step, "rng": torch.get_rng_state(), **state}, tmp)
        os.replace(tmp, path)
        for old in sorted(self.dir.glob("step-*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load(self, path: Path | None = None) -> dict | None:
        path = path or self.latest()
        if path is None:
            return None
        # weights_only: a checkpoint holds tensors, numbers, strings, lists and dicts only (no pickled
        # objects), so loading one cannot run code from the file.
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.set_rng_state(state["rng"])
        return state


# ---------------------------------------------------------------- metrics and progress


class Metrics:
    """Appends one JSON line per record to stage_dir/metrics.jsonl. On resume, lines past the
    checkpoint's step are dropped so that the log reads as one uninterrupted run."""

    def __init__(self, stage_dir: Path, resume_step: int | None = None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            kept = [r for r in read_jsonl_tolerant(self.path) if r.get("step", 0) <= resume_step]
            from alignloop.io import write_jsonl
            write_jsonl(self.path, kept)

    def log(self, **record) -> None:
        append_jsonl(self.path, record)


class Progress:
    """A one-line progress display: a tqdm bar on a terminal, a line every few seconds in a log."""

    def __init__(self, total: int, desc: str, start: int = 0):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=2.0,
                        disable=os.environ.get("ALIGNLOOP_QUIET") == "1")

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
        self.bar.update(n)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU (None on the CPU: no honest peak to divide by)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if re.search(pattern, name):
            return flops
    return None


# ---------------------------------------------------------------- memory: LoRA, checkpointing, peak


def apply_lora(model, rank: int, alpha: float, scalar_head: bool = False, seed: int = 0, top_layers: int = 0):
    """Low-rank adapters (`peft`) on every linear layer of the decoder; the base weights freeze. A scalar
    (reward/value) head is trained in full (`modules_to_save`). Returns the wrapped model.

    `top_layers` > 0: adapters on the last `top_layers` decoder blocks only. The backward pass then stops
    at the lowest of them (nothing below needs a gradient), so an update costs a forward pass and a small
    backward instead of a full one — the reward model's `--train-layers` layout, for the value model.

    The adapters' random start (A; B starts at 0) is drawn from `seed`, not from wherever the global
    generator happens to be: every process of a torchrun run then starts from the same adapters as one
    process does (FSDP2 shards each rank's own copy; it does not broadcast rank 0's as DDP does)."""
    from peft import LoraConfig, get_peft_model
    targets = "all-linear"
    if top_layers > 0:  # the linear layers of those blocks by name (peft takes no block range with "all-linear")
        trunk = getattr(model, model.base_model_prefix)
        blocks = list(trunk.layers)[-top_layers:]
        targets = [name for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and any(mod is x for b in blocks for x in b.modules())]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                     task_type="SEQ_CLS" if scalar_head else "CAUSAL_LM",
                     modules_to_save=["score"] if scalar_head else None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the caller's generator is left as it was
        # peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning on every LoRA
        # run that the user can do nothing about
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def merged(model):
    """The plain `transformers` model to save: LoRA adapters merged into the weights (an ordinary Hugging
    Face folder that any tool loads), or the model itself."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def train_top_layers(model, n: int) -> None:
    """Only the last n decoder blocks, the final norm and the scalar head learn (n = 0: the head alone;
    n < 0: everything)."""
    if n < 0:
        return
    from alignloop.forward import unwrap
    m = unwrap(model)
    trunk = getattr(m, m.base_model_prefix)
    layers = trunk.layers
    keep = {id(p) for layer in list(layers)[len(layers) - n:] for p in layer.parameters()}
    keep |= {id(p) for p in trunk.norm.parameters()} if n else set()
    keep |= {id(p) for p in m.score.parameters()}
    for p in m.parameters():
        p.requires_grad = id(p) in keep


def peak_memory_gb(device) -> float:
    """Peak memory of this process: the GPU allocator's peak on CUDA, else the resident set's peak."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def release_memory() -> None:
    """Give freed memory back to the operating system. PPO's shapes change every iteration (prompt and
    answer lengths), and glibc's heap keeps the freed blocks of each shape: the resident set of a 135M
    LoRA run grew by ~2 GB an iteration on the CPU until this was called after each one."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc (macOS, musl): nothing to trim
        pass
