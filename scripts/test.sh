#!/usr/bin/env bash
# The whole test suite. Tests that need a server, a browser, git history or the network skip locally
# when it is absent, each with its reason in the summary (-rs), and fail under CI=true. Extra arguments
# go to pytest (test files to run only those).
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
# Two workers (pytest-xdist, --dist loadfile): a module runs whole on one worker, so its module fixtures are
# made once; the session fixtures several modules read are made once for both (tests/conftest.py,
# once_per_session). Much of the suite waits with a core idle (an interpreter and torch starting, a server, a
# browser, one-thread runs); ALIGNLOOP_TEST_WORKERS=0 runs it all in this one process.
# OpenMP threads that wait for work sleep instead of spinning (the results are the same to the bit). With two
# workers, and tests that start subprocesses of two threads each, the machine's two cores hold more threads
# than cores; spinning ones then burn the cores others need: two micro recipes side by side took 215 s with
# the default policy and 48 s with PASSIVE. (One alone is ~1.2x slower passive, which is why the product
# keeps the default: docs/LOG.md, 2026-12-08.)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$PY" -m pytest -q -rs -n "${ALIGNLOOP_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
