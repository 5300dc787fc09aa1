#!/usr/bin/env bash
# The whole test suite. Tests that need a server, a browser, git history or the network skip locally
# when it is absent, each with its reason in the summary (-rs), and fail under CI=true. Extra arguments
# go to pytest (test files to run only those).
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec "$PY" -m pytest -q -rs "$@"
