"""The one precision policy (alignloop/precision.py): what each --dtype means on the CPU, and the warning
when bf16 is asked for on a CPU that has no bf16 instructions (there it is several times slower than fp32)."""
import subprocess
import sys

import torch

from alignloop import precision

CPU = torch.device("cpu")


def test_dtype_on_the_cpu():
    assert precision.amp_dtype(CPU, "auto") is None  # fp32 by default on the CPU
    assert precision.amp_dtype(CPU, "float32") is None
    assert precision.amp_dtype(CPU, "bfloat16") is torch.bfloat16
    with precision.autocast(CPU, "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast(CPU, "float32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _stderr(code: str) -> str:
    # a fresh process: the warning is said once a process
    return subprocess.run([sys.executable, "-c", "import torch; from alignloop import precision; "
                           "cpu = torch.device('cpu'); " + code],
                          capture_output=True, text=True, check=True, timeout=120).stderr


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_once():
    # training's autocast and the weights of serve/chat/eval (model.pick_dtype) share the one warning
    err = _stderr("precision.amp_dtype(cpu, 'bfloat16'); from alignloop.model import pick_dtype; "
                  "pick_dtype('bfloat16', 'cpu'); precision.amp_dtype(cpu, 'bfloat16')")
    # this machine's own CPU decides which case is checked (no stub): the warning iff it lacks them
    assert err.count("without bf16 instructions") == (0 if precision.cpu_has_bf16() else 1), err
    assert "without bf16" not in _stderr("precision.amp_dtype(cpu, 'float32'); precision.amp_dtype(cpu, 'auto')")
