"""The Python half of scripts/gpu-check.sh: what the machine is, and the figures of its checks.

    python scripts/gpu_check.py env OUT/env.json [--require-cuda]   # writes the JSON; prints the GPU count
    python scripts/gpu_check.py summarise OUT                        # OUT/checks.jsonl → results.json, results.md

`summarise` reads each pretraining check's metrics.jsonl: tokens/s and MFU are medians over the steps
after the first fifth (at least 3: warm-up, cuDNN autotuning and torch.compile land there); the final
loss is the mean of the last 5 steps that the check shares with the `bf16` one (the same seed, data
order and global batch), and a check more than 5% from it fails: a sharded or compiled step that learns
something else is a bug, not a speed-up. Exit 1 when any check failed (a skipped one is not).
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOSS_TOL = 0.05  # relative; bf16 rounding alone stays well under it over a few hundred steps


def env(dest: Path, require_cuda: bool) -> int:
    import torch
    if require_cuda and not torch.cuda.is_available():
        print("gpu-check: no CUDA device: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). This script checks the GPU paths; "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch (or try --dry-run on the CPU).",
              file=sys.stderr)
        return 3
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": gpus,
            "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
            "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(info, indent=2) + "\n")
    print(len(gpus))
    return 0


def _metrics(stage: Path) -> list[dict]:
    path = stage / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            pass
    return [r for r in out if "loss" in r]


def _figures(check: dict, out: Path) -> dict:
    """Throughput, MFU, loss and peak memory of one check, from its stage folder and its log."""
    rows = _metrics(out / check["stage"]) if check.get("stage") else []
    fig = {}
    if rows:
        fig["steps"] = len(rows)
        skip = max(3, len(rows) // 5) if len(rows) > 4 else 0
        steady = rows[skip:] or rows
        fig["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
        mfu = [r["mfu"] for r in steady if "mfu" in r]
        fig["mfu"] = statistics.median(mfu) if mfu else None
        fig["loss"] = {r["step"]: r["loss"] for r in rows}
    if check.get("run") and (out / check["run"] / "eval.json").exists():  # a whole recipe: its gold scores
        stages = json.loads((out / check["run"] / "eval.json").read_text()).get("stages", {})
        fig["gold"] = {name: m.get("gold_score") for name, m in stages.items()}
    log = out / "logs" / f"{check['name']}.log"
    mem = re.findall(r"peak memory ([0-9.]+) GB", log.read_text(errors="replace")) if log.exists() else []
    fig["peak_memory_gb"] = float(mem[-1]) if mem else None
    return fig


def summarise(out: Path) -> int:
    checks = [json.loads(line) for line in (out / "checks.jsonl").read_text().splitlines() if line.strip()]
    info = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    for c in checks:
        c.update(_figures(c, out))
    ref = next((c for c in checks if c["name"] == "bf16" and c.get("loss")), None)
    bad = [c["name"] for c in checks if c["status"] != "ok" and not c["status"].startswith("skipped")]
    for c in checks:
        if ref is None or c is ref or not c.get("loss"):
            continue
        common = sorted(set(c["loss"]) & set(ref["loss"]))[-5:]
        if not common:
            continue
        mine, theirs = (statistics.mean(d[s] for s in common) for d in (c["loss"], ref["loss"]))
        c["loss_vs_bf16"] = mine / theirs - 1
        if abs(c["loss_vs_bf16"]) > LOSS_TOL:
            c["status"] = f"loss {c['loss_vs_bf16']:+.1%} from bf16"
            bad.append(c["name"])
    for c in checks:
        c["final_loss"] = c["loss"][max(c["loss"])] if c.get("loss") else None
        c.pop("loss", None)
    (out / "results.json").write_text(json.dumps({"env": info, "checks": checks}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(info, checks))
    print((out / "results.md").read_text())
    if bad:
        print(f"gpu-check: FAILED: {', '.join(dict.fromkeys(bad))} (logs in {out / 'logs'})", file=sys.stderr)
        return 1
    return 0


def markdown(info: dict, checks: list[dict]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    gpus = info.get("gpus") or []
    head = (f"# gpu-check {info.get('date', '')}\n\n"
            f"{len(gpus)} × {gpus[0] if gpus else 'no GPU (dry run on the CPU)'}; torch {info.get('torch')}, "
            f"CUDA {info.get('cuda')}, commit {info.get('commit')}.\n"
            "tokens/s: all processes together, median after warm-up; MFU: of the bf16 dense peak of all the GPUs used; "
            "memory: peak allocated on one GPU.\n\n"
            "| check | processes | what | status | steps | tokens/s | MFU | memory GB | final loss | vs bf16 | wall s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {c['name']} | {c['nproc']} | {c['what']} | {c['status']} | {c.get('steps', '-')} | "
            f"{f(c.get('tokens_per_s'), ',.0f')} | {f(c.get('mfu'), '.1%')} | {f(c.get('peak_memory_gb'), '.2f')} | "
            f"{f(c.get('final_loss'), '.3f')} | {f(c.get('loss_vs_bf16'), '+.1%')} | {f(c.get('wall_s'), '.0f')} |"
            for c in checks]
    golds = [f"- {c['name']}: gold score " + ", ".join(f"{k} {f(v, '.3f')}" for k, v in c["gold"].items())
             for c in checks if c.get("gold")]
    return head + "\n".join(rows) + "\n" + ("\n" + "\n".join(golds) + "\n" if golds else "")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        return env(Path(argv[1]), "--require-cuda" in argv[2:])
    if len(argv) == 2 and argv[0] == "summarise":
        return summarise(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
