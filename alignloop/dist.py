"""Many processes, one per device, on PyTorch's own engine: `torchrun`, DDP, FSDP2 and the distributed
state-dict API. One process (no torchrun) takes none of these paths: `setup` returns the device, `wrap`
returns the model itself and every helper below is the one-process code, so nothing costs anything.

    torchrun --nproc_per_node 2 -m alignloop pretrain --preset micro --out runs/x [--fsdp]

How a stage uses it, top to bottom:
- `setup(cfg)` once: joins torchrun's process group (gloo on the CPU, nccl on CUDA), returns this
  process's device; on ranks other than 0 stdout is silenced and progress bars are off, so a stage's
  prints and bars appear once.
- The global batch is the same for any number of processes: each rank takes `part(rows)` of every
  global micro-batch (a deterministic shard) and scales its summed loss by `world() / n_global`, so
  that DDP's (and FSDP's) gradient average over ranks equals the one-process mean over the whole
  micro-batch; `all_sum` gives the logged loss of the whole batch.
- `wrap(model, fsdp)`: DDP by default; `fully_shard` per decoder block and at the root with `--fsdp`.
- Checkpoints and saved models hold FULL state dicts in the one-process layout (`capture`, `restore`,
  `gathered`), gathered to rank 0, so a run started with N processes resumes with M.
- Only rank 0 writes (`is_main`); `on_main(fn)` runs a check-and-write step there and gives its
  `InputError`, if any, to every rank, so all of them stop with the same message.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

from alignloop.errors import InputError
from alignloop.precision import amp_dtype


def launched() -> bool:
    """Started by torchrun with more than one process (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(cfg) -> torch.device:
    """This process's device; under torchrun also joins the process group (once). NCCL needs CUDA: asked
    for on a machine without it, the stage stops here, before any work."""
    from alignloop.model import pick_device
    backend = getattr(cfg, "dist_backend", "auto")
    if backend == "nccl" and not torch.cuda.is_available():
        raise InputError("the nccl backend needs CUDA, which this machine does not have (use gloo, or auto)",
                         field="dist_backend")
    name = getattr(cfg, "device", "auto")  # a stage without a device (world, rank) only joins the group
    if not launched():
        return pick_device(name)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(name)
    if device.type == "cuda":  # one process per GPU: torchrun's LOCAL_RANK picks it
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise InputError("the nccl backend needs the processes on CUDA devices (--device cuda)", field="dist_backend")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        if rank() != 0:  # one voice: the stage's prints and progress bars come from rank 0 only
            sys.stdout = open(os.devnull, "w")
            os.environ["ALIGNLOOP_QUIET"] = "1"
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def on_main(fn):
    """Run `fn` (a check that may write, e.g. the stage guard) on rank 0 alone; every rank then returns
    its result or raises its InputError, so no rank waits forever for one that stopped."""
    if world() == 1:
        return fn()
    box = [None, None]
    if is_main():
        try:
            box[0] = fn()
        except InputError as e:
            box[1] = (e.message, None if e.file is None else str(e.file), e.line, e.field)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise InputError(*box[1])
    return box[0]


# ---------------------------------------------------------------- sharding the global batch


def check_rows(n_rows: int, what: str, field: str) -> None:
    """Every rank needs at least one row of each global micro-batch."""
    if n_rows < world():
        raise InputError(f"torchrun started {world()} processes but {what} holds only {n_rows}: give at "
                         f"least one per process (or fewer processes)", field=field)


def part(items):
    """This rank's share of a global batch: items rank, rank + N, rank + 2N, … (deterministic)."""
    return items[rank()::world()] if world() > 1 else items


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a tensor; the same on every rank)."""
    if world() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_max(x: torch.Tensor) -> float:
    """The largest value over ranks, as a number."""
    if world() > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def same(x: float) -> float:
    """One value for every rank (the largest): a clock that decides when to stop, or where the LR schedule
    is, must agree across ranks, or one would stop (or step) while the others wait for it."""
    return all_max(torch.tensor(x, dtype=torch.float64)) if world() > 1 else x


def gather_rows(mine: list[int], *columns: list) -> tuple[list, ...]:
    """Each rank holds rows `mine` (positions in a global batch) of some columns (lists of Python objects:
    token ids, texts); every rank gets every column whole, in batch order."""
    if world() == 1:
        return tuple(list(c) for c in columns)
    parts = [None] * world()
    dist.all_gather_object(parts, [mine, *columns])
    n = sum(len(p[0]) for p in parts)
    out = [[None] * n for _ in columns]
    for rows, *cols in parts:
        for c, col in enumerate(cols):
            for i, v in zip(rows, col):
                out[c][i] = v
    return tuple(out)


def grad_sync(model, on: bool):
    """Gradient accumulation: reduce across ranks only at the last micro-batch of a step."""
    if world() == 1 or on:
        return contextlib.nullcontext()
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def later():
            yield
            model.set_requires_gradient_sync(True)
        return later()
    return model.no_sync()


# ---------------------------------------------------------------- DDP / FSDP2


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def plain(model):
    """The model under DDP's wrapper (FSDP2 keeps the model itself, sharded in place)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap(model, fsdp: bool, device: torch.device, dtype: str = "auto"):
    """DDP (a full copy per process, gradients all-reduced), or with `fsdp` FSDP2: `fully_shard` on each
    decoder block and then the root, so parameters, gradients and optimizer state are split over the
    processes and one block at a time is gathered. Mixed precision bf16 on a GPU (the policy of
    `precision.amp_dtype`, the one place that decides it); fp32 on the CPU. Build the optimizer after this."""
    if world() == 1:
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel
        # no buffer sync in forward: the only buffers (rotary frequencies) are constants, and a broadcast in every
        # forward would tie evaluation passes across ranks for nothing.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from transformers import PreTrainedModel

    mesh = init_device_mesh(device.type, (world(),))
    half = amp_dtype(device, dtype)
    mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))  # under peft or forward.Through
    for block in getattr(hf, hf.base_model_prefix).layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def fsdp_modules(net) -> list:
    """Every module `fully_shard` was applied to under `net` (the decoder blocks and the root)."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in net.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole(net):
    """Every weight of `net` whole on every rank for the duration (a collective: all ranks enter): what the
    engine reads when it samples from an FSDP2 policy. It reaches into the modules' weights directly and
    runs no forward pass that FSDP would see, so the rows each rank samples need no collective (the
    ranks may take different numbers of steps). DDP and one process: the weights are whole already.

    Two FSDP2 details this relies on: `unshard()` is per module (not recursive), so each sharded block and
    the root are gathered; and the unsharded parameters are the same tensors every time, refilled by the
    all-gather without a bump of their version counter. A cache keyed on (id, version) — the engine's
    fused q/k/v weights — would then serve the weights of before the last optimizer step; bumping each
    version here (free: no data moves) makes such a cache rebuild once per gather."""
    mods = fsdp_modules(net)
    if not mods:
        yield net
        return
    for m in mods:
        m.reshard()  # a group left gathered by a forward without backward (the root) is gathered afresh
    for m in mods:
        m.unshard()
    with torch.no_grad():
        for q in net.parameters():
            torch.autograd.graph.increment_version(q)
    try:
        yield net
    finally:
        for m in mods:
            m.reshard()


# ---------------------------------------------------------------- full state dicts on rank 0


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # cpu_offload with full_state_dict: only rank 0 receives the tensors (the others get {}).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _fqn_order(model, opt) -> list[str]:
    """The optimizer's parameters by name, in its own order: position i is id i of `opt.state_dict()`."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in opt.param_groups for p in g["params"]]


def model_state(model) -> dict:
    """The whole model's weights on the CPU (rank 0; {} elsewhere under FSDP). Collective under FSDP."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(model, options=_full())
    if not is_main():
        return {}
    return {k: v.detach().cpu().clone() for k, v in plain(model).state_dict().items()}


def _prefix(net, model) -> str:
    """Where `model` sits in `net` ("" when it is `net`; "model" under `forward.Through`)."""
    return next(n for n, m in net.named_modules() if m is model)


def _inner(state: dict, prefix: str) -> dict:
    """`net`'s state dict → `model`'s (its keys without the prefix)."""
    return {k[len(prefix) + 1:] if prefix else k: v for k, v in state.items() if not prefix or k.startswith(prefix + ".")}


def _local_capture(model, opt) -> dict:
    """What a checkpoint holds of a model and its optimizer in one process: the whole state, or — for a
    partly frozen model (LoRA, top layers) — only what learns (the rest is reloaded from the stage's start)."""
    if all(p.requires_grad for p in model.parameters()):
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        state = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    return {"model": state, "optim": opt.state_dict()}


def _local_restore(state: dict, model, opt) -> None:
    missing = model.load_state_dict(state["model"], strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"checkpoint holds parameters this model lacks: {missing.unexpected_keys[:3]}")
    opt.load_state_dict(state["optim"])


def capture(net, opt, model=None) -> dict:
    """What a checkpoint holds (see `_local_capture`) of `model` (the module given to `wrap`, by default `net`
    itself), in the one-process layout whatever the number of processes, so that N processes resume a run of
    M. Collective under FSDP; filled on rank 0 only."""
    model = plain(net) if model is None else model
    if not is_fsdp(net):
        return _local_capture(model, opt) if is_main() else {}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = model_state(net)
    osd = get_optimizer_state_dict(net, opt, options=_full())
    if not is_main():
        return {}
    state = _inner(state, _prefix(net, model))
    if not all(q.requires_grad for q in model.parameters()):  # LoRA, top layers: what learns (as _local_capture)
        learns = {n for n, q in model.named_parameters() if q.requires_grad}
        state = {k: v for k, v in state.items() if k in learns}
    # names → ids: the layout `torch.optim.Optimizer.state_dict()` writes in one process
    ids = {n: i for i, n in enumerate(_fqn_order(net, opt))}
    optim = {"state": {ids[n]: s for n, s in osd["state"].items()},
             "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in osd["param_groups"]]}
    return {"model": state, "optim": optim}


def restore(state: dict, net, opt, model=None) -> None:
    """Load a checkpoint written by any number of processes (every rank has read the whole file) into
    `model` (the module given to `wrap`, by default `net` itself) and its optimizer."""
    model = plain(net) if model is None else model
    if not is_fsdp(net):
        return _local_restore(state, model, opt)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    # each rank keeps its own shard of the full tensors; a partly frozen model's checkpoint holds only what
    # learns (the rest is as loaded at the stage's start), hence not strict
    opts = StateDictOptions(full_state_dict=True, strict=False)
    prefix = _prefix(net, model)
    keys = set_model_state_dict(net, {f"{prefix}.{k}" if prefix else k: v for k, v in state["model"].items()},
                                options=opts)
    if keys.unexpected_keys:
        raise ValueError(f"checkpoint holds parameters this model lacks: {keys.unexpected_keys[:3]}")
    names = _fqn_order(net, opt)
    osd = state["optim"]
    optim = {"state": {names[i]: s for i, s in osd["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(net, opt, optim, options=opts)


def gathered(net, model=None):
    """The model `net` trains (`model`: the one given to `wrap`, by default `net` itself) with every weight, on
    rank 0, None elsewhere: what rank 0 saves as a Hugging Face folder or evaluates alone. Collective under
    FSDP, where a fresh copy is built on the CPU from the full state dict (a `peft` model: the same
    adapters on a fresh base, so that `loop.merged` works on it as on the original)."""
    model = plain(net) if model is None else model
    if not is_fsdp(net):
        return model if is_main() else None
    state = model_state(net)
    if not is_main():
        return None
    state = _inner(state, _prefix(net, model))
    copy = _fresh(model)
    copy.load_state_dict(state)
    return copy


def _fresh(model):
    """An unsharded model of `model`'s class and configuration, on the CPU, with fresh weights."""
    from torch.distributed.fsdp import FSDPModule
    if hasattr(model, "get_base_model"):  # peft around a transformers model: the same adapters on a fresh base
        from peft import get_peft_model
        return get_peft_model(_fresh(model.get_base_model()), model.peft_config[model.active_adapter])
    # fully_shard turned the class of the module it was applied to into FSDP<cls>(FSDPModule, cls)
    cls = next(c for c in type(model).__bases__ if c is not FSDPModule) if is_fsdp(model) else type(model)
    return cls(model.config)
