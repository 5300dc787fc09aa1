"""scripts/gpu-check.sh, as far as a machine without a GPU can take it: its arguments, its refusal without
CUDA, the summary its Python half writes, and (slow) the whole script on the CPU with --dry-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def gpu_check(*args, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})


def test_the_script_parses_and_refuses_bad_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = gpu_check("--max-steps", "ten", "--out", tmp_path)
    assert proc.returncode == 2 and "--max-steps wants a whole number" in proc.stderr
    proc = gpu_check("--frobnicate")
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr
    assert "--dry-run" in gpu_check("--help").stdout


def test_without_cuda_it_stops_at_once_with_exit_3(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = gpu_check("--out", tmp_path / "gc")
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "gc" / "data").exists()  # nothing was built


def check(out, name, losses, tps, status="ok"):
    stage = out / name / "pretrain"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": v, "tokens_per_s": t, "mfu": t / 1e6}) + "\n"
        for i, (v, t) in enumerate(zip(losses, tps))))
    return {"name": name, "nproc": 2, "what": name, "status": status, "wall_s": 1, "stage": f"{name}/pretrain", "run": name}


def test_summary_figures_and_a_loss_that_drifts_fails(tmp_path):
    losses = [9.0, 8.0, 7.0, 6.5, 6.0, 5.8, 5.6, 5.5, 5.4, 5.3]
    slow_start = [10.0, 50.0, 90.0] + [100.0] * 7  # warm-up steps left out of the median
    checks = [check(tmp_path, "bf16", losses, slow_start),
              check(tmp_path, "ddp", [v * 1.01 for v in losses], [200.0] * 10),
              check(tmp_path, "fsdp", [v * 1.10 for v in losses], [150.0] * 10),
              {"name": "ddp-compile", "nproc": 2, "what": "x", "status": "skipped: one GPU", "wall_s": None,
               "stage": "", "run": ""}]
    (tmp_path / "checks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checks))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "summarise", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "FAILED: fsdp" in proc.stderr and "ddp-compile" not in proc.stderr
    res = {c["name"]: c for c in json.loads((tmp_path / "results.json").read_text())["checks"]}
    assert res["bf16"]["tokens_per_s"] == 100.0 and res["bf16"]["mfu"] == pytest.approx(1e-4)
    assert res["ddp"]["status"] == "ok" and res["ddp"]["loss_vs_bf16"] == pytest.approx(0.01)
    assert res["fsdp"]["status"] == "loss +10.0% from bf16" and res["fsdp"]["final_loss"] == pytest.approx(5.83)
    assert "| ddp | 2 | ddp | ok | 10 | 200 | 0.0% |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_dry_run_on_the_cpu(gpu_check_dry_run):
    """Every check the CPU can run: one process, DDP and FSDP2 with 2 processes (gloo), the micro recipe
    (conftest.py runs the script once a session: tests/test_distributed_run.py reads its micro recipe too)."""
    out, proc = gpu_check_dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = {c["name"]: c for c in json.loads((out / "results.json").read_text())["checks"]}
    for name in ("bf16", "ddp", "fsdp", "micro-recipe"):
        assert res[name]["status"] == "ok", name
    for name in ("ddp", "fsdp"):  # fp32 on the CPU: the same steps as one process
        assert res[name]["steps"] == 3 and abs(res[name]["loss_vs_bf16"]) < 1e-4
    assert set(res["micro-recipe"]["gold"]) == {"base", "sft", "round-1/ppo", "round-2/ppo"}
    assert res["bf16-compile"]["status"].startswith("skipped")
    assert "| ddp | 2 | torchrun, DDP | ok | 3 |" in (out / "results.md").read_text()
