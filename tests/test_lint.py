"""The code style check: `ruff check` over the repository with pyproject.toml's [tool.ruff] rules
(pyflakes' unused/undefined names, pycodestyle's errors and warnings, lines ≤ 140)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    return [exe] if exe else None


def test_ruff_is_clean():
    cmd = _ruff()
    if cmd is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ruff is not installed (it is in the test extras: pip install -e '.[test]')")
        pytest.skip("ruff is not installed (pip install ruff, or the test extras)")
    res = subprocess.run([*cmd, "check", "--output-format", "concise", "alignloop", "tests", "benchmarks",
                          "experiments", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
