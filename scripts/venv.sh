# Sourced by run.sh and test.sh: create or reuse .venv (Python >= 3.11: $PYTHON, default python3) and
# install alignloop into it (once per change of pyproject.toml). torch comes first, pinned, and only when
# the venv has none (one already there is never reinstalled):
# - on Linux without an NVIDIA GPU (no nvidia-smi): the CPU build. A wheel this machine already holds
#   (pip's find-links) is taken first without the network; else PyTorch's CPU-only index, PyPI beside it
#   for torch's own dependencies. A plain `pip install torch` there would pull the CUDA build (GBs).
# - elsewhere (a CUDA machine, macOS, Windows): PyPI's default build, CUDA's on Linux.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${ALIGNLOOP_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH="torch==2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
if [ ! -x "$PY" ]; then
  BASE_PY="${PYTHON:-python3}"
  if ! "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "scripts/venv.sh: alignloop needs Python >= 3.11, and $BASE_PY is $("$BASE_PY" -V 2>/dev/null || echo 'not found'); set PYTHON=python3.11 (or newer)" >&2
    exit 2
  fi
  "$BASE_PY" -m venv "$VENV"
fi
install_torch() {
  if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
      "$PY" -m pip install -q "$TORCH"   # its dependencies (torch itself is there now: nothing is downloaded for it)
    else
      "$PY" -m pip install -q "$TORCH" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
  else
    "$PY" -m pip install -q "$TORCH"
  fi
}
STAMP="$VENV/.alignloop-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' || install_torch
  "$PY" -m pip install -q -e ".[web,test]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
