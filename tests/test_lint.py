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


def test_no_test_module_sets_the_environment_at_import():
    """pytest imports every test module before the first test runs, so a module-level `os.environ[...] = ...`
    or `setdefault` holds for the whole session: it once set OMP_NUM_THREADS=1 for every subprocess of the
    suite, which ran the end-to-end tests on one core of two and changed their floating-point results from
    those of the same test run alone. Set a child's environment in its own `env=`, or use monkeypatch;
    what the whole session shares (ALIGNLOOP_QUIET) is set once, in conftest.py, where it is plain to see."""
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / "tests").glob("test_*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if line.startswith("os.environ") or line.startswith("os.putenv")]
    assert not found, "\n".join(found)
