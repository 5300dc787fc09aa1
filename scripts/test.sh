#!/usr/bin/env bash
# The whole test suite. Tests that need a server or a browser skip locally when it is absent and
# fail under CI=true. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec "$PY" -m pytest -q "$@"
