# Sourced by run.sh and test.sh: create or reuse .venv and install alignloop into it (once per change
# of pyproject.toml). torch comes first and pinned: a bare `torch` would pull CUDA wheels on a CPU box.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${ALIGNLOOP_VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.alignloop-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[web,test]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
